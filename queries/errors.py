"""Errors of the query module. Each one a person can act on, and each answers with its HTTP status
and a JSON body `{"error": code, "message": ...}` (queries/service.py); never a traceback."""

from __future__ import annotations

from typing import Any


class QueryDefinitionError(ValueError):
    """A named-query file is invalid; the message names the file (stops start-up)."""


class QueryError(Exception):
    """A request the service refuses. `status` is its HTTP status, `code` a stable word."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class Unauthorised(QueryError):
    status, code = 401, "unauthorised"


class UnknownQuery(QueryError):
    status, code = 404, "unknown_query"


class InvalidParameters(QueryError):
    status, code = 400, "invalid_parameters"


class RejectedStatement(QueryError):
    """Ad-hoc SQL that is not one read-only SELECT (ClickHouse's parser or `readonly` said no)."""

    status, code = 403, "not_read_only"


class InvalidSql(QueryError):
    status, code = 400, "invalid_sql"


class TooManyRows(QueryError):
    status, code = 413, "too_many_rows"


class QueryTimeout(QueryError):
    status, code = 400, "timeout"


class NotAcceptable(QueryError):
    status, code = 406, "not_acceptable"


class ReadModelMissing(QueryError):
    """The read model a named query reads does not exist yet (the projector creates it once its
    sources have replicas). Not the client's fault, so a 503 with a message, not a 4xx."""

    status, code = 503, "read_model_missing"


class ReadModelFailed(QueryError):
    """A read model the query reads has failed (its family serves no version: a definition met
    a value it cannot take, or a verification found a difference). Its rows are no longer kept,
    so no answer would be right: a 503 with the reason until a rebuild brings it back, never a
    stale 200, whatever `min_lsn` says."""

    status, code = 503, "read_model_failed"


class Unavailable(QueryError):
    """ClickHouse cannot be reached right now."""

    status, code = 503, "unavailable"


class Busy(QueryError):
    """Too many ad-hoc statements at once: the client retries after `retry_after_s` seconds."""

    status, code = 429, "busy"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BodyTooLarge(QueryError):
    status, code = 413, "body_too_large"
