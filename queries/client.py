"""A client of a running query service (`projector query --url`): the named queries and their
answers as GET /queries and GET /queries/NAME give them (queries/api.py).

Errors as the service states them: a refusal is the `QueryError` it answered with (its status
and message), a service that does not answer a `ProjectorError`, and a read-your-writes request
the read models have not reached in time (202) `StillProcessing`.
"""

from __future__ import annotations

from typing import Any

import httpx

from projector.errors import ProjectorError
from queries.errors import QueryError


class StillProcessing(Exception):
    """202: the read models have not reached the request's `min_lsn` in time; ask again."""

    def __init__(self, message: str, watermark: str | None) -> None:
        super().__init__(f"still processing: {message} (watermark {watermark})")


def list_queries(url: str, token: str) -> list[dict[str, Any]]:
    """Every named query with its description and parameters (GET /queries)."""
    queries: list[dict[str, Any]] = _get(url, "/queries", token, None, timeout_s=30)["queries"]
    return queries


def named_query(
    url: str,
    token: str,
    name: str,
    params: dict[str, str],
    limit: int,
    offset: int,
    min_lsn: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the named query `name` (GET /queries/NAME): its rows and the read models'
    watermark LSN they were read at."""
    query_params = {**params, "limit": str(limit), "offset": str(offset)}
    if min_lsn:
        query_params["min_lsn"] = min_lsn
    body = _get(url, f"/queries/{name}", token, query_params, timeout_s=90)
    return body["rows"], body["watermark"]["lsn"]


def _get(
    url: str, path: str, token: str, params: dict[str, str] | None, timeout_s: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    try:
        found = httpx.get(
            f"{url.rstrip('/')}{path}", params=params, headers=headers, timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        raise ProjectorError(f"the query service at {url} does not answer: {exc}") from exc
    body: dict[str, Any] = found.json()
    if found.status_code == 202:
        raise StillProcessing(body["message"], body["watermark"]["lsn"])
    if found.status_code >= 400:
        error = QueryError(body.get("message", found.text))
        error.status = found.status_code
        raise error
    return body
