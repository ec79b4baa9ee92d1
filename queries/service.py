"""The query service: named queries, ad-hoc SQL, read-your-writes and the ops page over HTTP.

`QueryService` does the work and knows nothing of HTTP (the CLI uses it too); `create_app` puts
FastAPI in front of it. A named query's way through `QueryService.named`:

1. Check the parameters against the query's declarations (queries/named.py); refuse with 400.
2. If the client passed `min_lsn` (its Postgres LSN after commit), wait up to `wait_ms` until the
   query's read models have reached it (queries/consistency.py); still behind: a `Pending`
   answer (HTTP 202 with the current watermark and Retry-After).
3. Look the result up in the cache under (query, parameters, page, format, watermark now); the
   watermark is at least `min_lsn` here, so a hit is never older than asked (queries/cache.py).
4. Else run it: `SELECT * FROM (<query>) LIMIT <limit + 1> OFFSET <offset>`, parameters bound by
   ClickHouse; one row more than the page tells whether there is a next page.
5. Answer with the watermark it reflects (the one read in step 2/3: the data are at least that
   new), in the body and in the `X-Watermark-LSN` header.
"""

from __future__ import annotations

import base64
import csv
import hmac
import io
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from projector.clickhouse import ParameterisedClickHouse, ParamValue
from projector.commit.consistency import Consistency
from projector.commit.transactions import lsn_text, parse_lsn
from projector.errors import ClickHouseUnavailable
from queries.adhoc import SqlLimits, clickhouse_code, first_line, run_read_only
from queries.cache import CacheKey, ResultCache
from queries.consistency import ReadModelHealth, ReadPositions
from queries.errors import (
    Busy,
    InvalidParameters,
    NotAcceptable,
    ReadModelFailed,
    ReadModelMissing,
    Unauthorised,
    Unavailable,
    UnknownQuery,
)
from queries.named import NamedQuery
from queries.sql_guard import EVERY_DATABASE, Scope

log = logging.getLogger("queries")
STATIC_DIR = Path(__file__).with_name("static")
FORMATS = {"json": "application/json", "csv": "text/csv; charset=utf-8"}
UNKNOWN_OBJECT = {60, 81}  # ClickHouse UNKNOWN_TABLE, UNKNOWN_DATABASE


@dataclass(frozen=True)
class Limits:
    wait_ms: int = 5_000
    max_page: int = 10_000
    sql: SqlLimits = field(default_factory=SqlLimits)
    retry_after_s: int = 1
    sql_max_concurrent: int = 2  # ad-hoc statements at once; beyond: Busy (429)
    max_waiters: int = 16  # requests waiting for min_lsn at once; beyond: Pending at once
    max_body_bytes: int = 1024**2


@dataclass(frozen=True)
class Rows:
    """A result in the service's hands: JSONEachRow lines (one row each)."""

    lines: list[str]
    has_more: bool


@dataclass(frozen=True)
class Answer:
    query: str
    rows: Rows
    watermark: Consistency
    limit: int
    offset: int
    cached: bool = False

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.rows.lines) if self.rows.has_more else None


@dataclass(frozen=True)
class Pending:
    """The read models have not reached the client's LSN in time."""

    query: str
    min_lsn: int
    watermark: Consistency


def watermark_body(position: Consistency) -> dict[str, Any]:
    mark = position.watermark
    return {
        "lsn": position.lsn_text if position.lsn else None,
        "tx_id": mark.tx_id if mark else None,
        "commit_time_ms": position.commit_ms or None,
        "waiting_for_tx": position.waiting_for,
    }


def parse_min_lsn(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return parse_lsn(text)
    except ValueError as exc:
        raise InvalidParameters(
            f"min_lsn: {exc} (pass the writer's SELECT pg_current_wal_lsn() after its commit)"
        ) from exc


def parse_int(name: str, text: str | None, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError as exc:
        raise InvalidParameters(f"{name}: {text!r} is not a whole number") from exc
    if not low <= value <= high:
        raise InvalidParameters(f"{name}: must be between {low} and {high}, got {value}")
    return value


@dataclass
class QueryService:
    ch: ParameterisedClickHouse
    queries: dict[str, NamedQuery]
    positions: ReadPositions
    cache: ResultCache[Rows]
    limits: Limits = field(default_factory=Limits)
    read_your_writes: bool = True  # transaction metadata on: watermarks exist
    observe: Callable[[str], None] = lambda event: None  # "hit", "miss", "pending"
    # The databases ad-hoc SQL may read (the read models' and the replicas').
    sql_scope: Scope = EVERY_DATABASE
    health: ReadModelHealth | None = None  # which read models failed (None: not asked)

    def __post_init__(self) -> None:
        self._sql_slots = threading.BoundedSemaphore(self.limits.sql_max_concurrent)
        self._waiters = threading.BoundedSemaphore(max(1, self.limits.max_waiters))

    def named(
        self,
        name: str,
        raw: Mapping[str, str],
        limit: int,
        offset: int,
        min_lsn: int | None = None,
        wait_ms: int | None = None,
    ) -> Answer | Pending:
        query = self.queries.get(name)
        if query is None:
            raise UnknownQuery(
                f"no named query {name!r}; GET /queries lists them: {', '.join(self.queries)}"
            )
        params = query.bind(raw)  # 1
        self._refuse_failed(query)
        if min_lsn is not None and not self.read_your_writes:
            raise InvalidParameters(
                "min_lsn needs watermarks, and this deployment runs without transaction metadata "
                "(PROJECTOR_TRANSACTION_METADATA=false)"
            )
        timeout_s = min(self.limits.wait_ms, wait_ms if wait_ms is not None else 1 << 30) / 1000
        if min_lsn is not None:  # 2
            position = self._wait_for(query.read_models, min_lsn, timeout_s)
            if position.lsn < min_lsn:
                self.observe("pending")
                return Pending(name, min_lsn, position)
        else:
            position = self.positions.of(query.read_models)
        key = _cache_key(name, params, limit, offset, position)
        rows = self.cache.get(key)  # 3
        if rows is not None:
            self.observe("hit")
            return Answer(name, rows, position, limit, offset, cached=True)
        if self.cache.enabled and position.lsn > 0:
            self.observe("miss")
        try:
            rows = self._run(query, params, limit, offset)  # 4
        except ReadModelMissing:
            if min_lsn is None:
                raise  # 503: nothing says when it will be there
            # Being created (its sources' replicas are still coming): to a client waiting for
            # its write, that is "behind", and the answer is coming (202, Retry-After).
            self.observe("pending")
            return Pending(name, min_lsn, position)
        self.cache.put(key, rows)
        return Answer(name, rows, position, limit, offset)  # 5

    def _refuse_failed(self, query: NamedQuery) -> None:
        """A failed read model answers 503 with its reason, never its stale rows."""
        failure = self.health.failure(query.read_models) if self.health is not None else None
        if failure is not None:
            raise ReadModelFailed(
                f"query {query.name} reads a read model that has failed and is no longer kept "
                f"({failure}); `projector rebuild` brings it back"
            )

    def _wait_for(self, read_models: list[str], lsn: int, timeout_s: float) -> Consistency:
        """Step 2's wait, bounded: at most `max_waiters` requests wait at once (each holds a
        worker thread); beyond them a request gets the position now (202 if behind), so the
        service's threads stay free for everyone else."""
        if self.limits.max_waiters == 0 or not self._waiters.acquire(blocking=False):
            return self.positions.of(read_models)
        try:
            return self.positions.wait_for(read_models, lsn, timeout_s)
        finally:
            self._waiters.release()

    def cached(
        self,
        name: str,
        params: dict[str, ParamValue],
        limit: int,
        offset: int,
        min_lsn: int | None,
    ) -> Answer | None:
        """Steps 2-3 of `named` when they need neither waiting nor ClickHouse: the cached answer
        under the position the read models stand at now, if that is known without a refresh, is
        at least `min_lsn`, and has a live entry; else None (`named` then does it all). `params`
        are bound already (`NamedQuery.bind`)."""
        query = self.queries[name]
        if min_lsn is not None and not self.read_your_writes:
            return None
        if self.health is not None and self.health.failure(query.read_models):
            return None  # `named` answers it: 503
        position = self.positions.of_now(query.read_models)
        if position is None or (min_lsn is not None and position.lsn < min_lsn):
            return None
        rows = self.cache.get(_cache_key(name, params, limit, offset, position), count_miss=False)
        if rows is None:
            return None
        self.observe("hit")
        return Answer(name, rows, position, limit, offset, cached=True)

    def _run(
        self, query: NamedQuery, params: dict[str, ParamValue], limit: int, offset: int
    ) -> Rows:
        page = f"SELECT * FROM ({query.sql}) LIMIT {int(limit) + 1} OFFSET {int(offset)}"
        try:
            out = self.ch.query(page, "JSONEachRow", params)
        except ClickHouseUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        except Exception as exc:
            if clickhouse_code(exc) in UNKNOWN_OBJECT:
                raise ReadModelMissing(
                    f"query {query.name} reads {', '.join(query.read_models)}, which does not "
                    "exist yet: the projector creates a read model once its source tables have "
                    "replicas and serves it once it is backfilled (`projector read-models list` "
                    f"shows its progress; pass min_lsn to wait for it) ({first_line(exc)})"
                ) from exc
            raise
        lines = [line for line in out.splitlines() if line.strip()]
        return Rows(lines[:limit], len(lines) > limit)

    def sql(self, statement: str) -> tuple[list[str], Consistency]:
        """Ad-hoc SQL: rows (JSONEachRow lines) and the least advanced read model's position
        (the statement may read any of them) taken before it ran. Beyond
        `sql_max_concurrent` statements at once: `Busy`, before anything asks ClickHouse (on
        chDB one engine serves everyone: a request must not queue behind the slow ones)."""
        if not self._sql_slots.acquire(blocking=False):
            raise Busy(
                f"{self.limits.sql_max_concurrent} ad-hoc statement(s) are running already "
                "(PROJECTOR_SQL_MAX_CONCURRENT); try again shortly",
                retry_after_s=self.limits.retry_after_s,
            )
        try:
            position = self.positions.of(list(self.positions.tracker.groups))
            lines = run_read_only(self.ch, statement, self.limits.sql, self.sql_scope)
        finally:
            self._sql_slots.release()
        return lines, position

    def describe(self) -> list[dict[str, Any]]:
        return [q.describe() for q in self.queries.values()]


def _cache_key(
    name: str, params: dict[str, ParamValue], limit: int, offset: int, position: Consistency
) -> CacheKey:
    return CacheKey(name, tuple(sorted(params.items())), (limit, offset), "rows", position.lsn)


# ---- rendering -----------------------------------------------------------------------------


def json_body(query: str | None, lines: list[str], position: Consistency, page: Any) -> bytes:
    """The envelope around ClickHouse's own JSON rows (spliced, not re-encoded: decimals stay
    exact and large results cost no Python objects)."""
    head = {"query": query, "watermark": watermark_body(position)}
    if page is not None:
        head["page"] = page
    text = json.dumps(head)[:-1] + ',"rows":[' + ",".join(lines) + "]}"
    return text.encode()


def csv_body(lines: list[str]) -> bytes:
    rows = [json.loads(line) for line in lines]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if rows:
        writer.writerow(list(rows[0]))
    for row in rows:
        writer.writerow(
            [
                json.dumps(v) if isinstance(v, list | dict) else "" if v is None else v
                for v in row.values()
            ]
        )
    return out.getvalue().encode()


def choose_format(accept: str | None, explicit: str | None) -> str:
    """`?format=` wins; else the Accept header: text/csv → csv; JSON for anything else it can
    give (application/json, */*, none)."""
    if explicit:
        if explicit not in FORMATS:
            raise InvalidParameters(f"format: one of {', '.join(FORMATS)}, got {explicit!r}")
        return explicit
    wanted = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    if "text/csv" in wanted:
        return "csv"
    if not accept or any(w in ("application/json", "*/*", "application/*", "") for w in wanted):
        return "json"
    raise NotAcceptable(f"this service answers application/json or text/csv, not {accept!r}")


def check_token(expected: str, authorization: str | None) -> None:
    """The API token, as `Bearer <token>` (programs) or as the password of HTTP Basic
    credentials, any user name (browsers: they ask for it and send it with every request)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "basic" and given:
        try:
            given = base64.b64decode(given.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = ""
    elif scheme.lower() != "bearer":
        given = ""
    if not given:
        raise Unauthorised("send the API token as 'Authorization: Bearer <PROJECTOR_API_TOKEN>'")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorised("the API token is not valid")


def lsn_or_none(lsn: int) -> str | None:
    return lsn_text(lsn) if lsn else None
