"""The HTTP face of the query service (FastAPI; OpenAPI at /docs).

| endpoint | what |
|---|---|
| `GET /queries` | the named queries: names, descriptions, parameters |
| `GET /queries/{name}?param=…&limit=&offset=&min_lsn=&wait_ms=` | one named query, a page of rows; JSON, or CSV on `Accept: text/csv` (or `format=csv`) |
| `POST /sql` `{"sql": "SELECT …"}` | ad-hoc read-only SQL (queries/adhoc.py) |
| `GET /health` | liveness, without a token |
| `GET /metrics` | Prometheus: requests, latency, cache hits and misses, 202s |
| `GET /ops/status` | what the ops page shows (queries/ops.py) |
| `GET /` | the ops page: one static HTML file, no build step |

Every endpoint but `/health` needs the token: `Authorization: Bearer <PROJECTOR_API_TOKEN>` from
programs, or HTTP Basic credentials with the token as the password from a browser — the pages
(`/`, `/docs`, `/openapi.json`) answer a missing token with a Basic challenge, so the browser asks
once and sends the credentials with every request the page makes.

A named query's cache hit, the commonest request, is answered by `CacheHits` before FastAPI
routes it: the same token check, parsing, cache key, response bytes and metrics, at a fraction of
the cost; anything that is not a plain hit goes on to FastAPI.

Bad input of any kind answers 4xx with `{"error": code, "message": ...}`; an unexpected failure
answers 500 with a JSON message and is logged, never a traceback to the client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from queries.errors import BodyTooLarge, Busy, InvalidParameters, QueryError
from queries.named import PARAMETER_TYPES, NamedQuery
from queries.service import (
    FORMATS,
    STATIC_DIR,
    Answer,
    Pending,
    QueryService,
    Rows,
    check_token,
    choose_format,
    csv_body,
    json_body,
    lsn_or_none,
    parse_int,
    parse_min_lsn,
    watermark_body,
)

log = logging.getLogger("queries")
RESERVED = ("limit", "offset", "min_lsn", "wait_ms", "format")
OPEN_PATHS = frozenset({"/health"})
# Pages a person opens in a browser: a refused request asks the browser for credentials (HTTP
# Basic, the API token as the password), which it then sends with every request of the page.
PAGE_PATHS = frozenset({"/", "/docs", "/openapi.json", "/docs/oauth2-redirect"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SqlRequest(BaseModel):
    model_config = {"extra": "forbid"}

    sql: str = Field(description="One read-only SELECT (WITH and UNION allowed).")
    format: str | None = Field(default=None, description="json (default) or csv")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "query_requests", "HTTP requests answered.", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "query_request_seconds",
            "Time to answer one HTTP request.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "query_cache", "Named-query cache lookups.", ["result"], registry=registry
        )
        self.pending = Counter(
            "query_pending",
            "Answers 202: the read model had not reached min_lsn in time.",
            registry=registry,
        )

    def observe(self, event: str) -> None:
        if event == "pending":
            self.pending.inc()
        else:
            self.cache.labels(event).inc()


class AuthAndMeasure:
    """ASGI middleware (a plain one: FastAPI's `@app.middleware` costs a task per request): the
    token check for every path but the open ones, then the request's count and latency by route
    template (not by raw path, so the label set stays bounded)."""

    def __init__(self, app: ASGIApp, token: str, metrics: ApiMetrics) -> None:
        self.app = app
        self.token = token
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def remember_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS:
                headers = dict(scope["headers"])
                authorization = headers.get(b"authorization", b"").decode("latin-1")
                check_token(self.token, authorization or None)
        except QueryError as exc:
            response = error_response(exc)
            if scope["path"] in PAGE_PATHS:
                response.headers["WWW-Authenticate"] = (
                    'Basic realm="cdc-projector (password: the API token)", charset="UTF-8"'
                )
            await response(scope, receive, remember_status)
        else:
            await self.app(scope, receive, remember_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` is refused with 413 before it is
    read (by its Content-Length), or as soon as more arrives than that (a chunked body): a client
    cannot make the service hold or parse hundreds of megabytes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            BodyTooLarge(
                f"the request body is larger than {self.max_bytes:,} bytes "
                "(PROJECTOR_QUERY_MAX_BODY_BYTES)"
            )
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await too_large(scope, receive, send)
            return
        if declared is not None:  # within the limit: the app reads it as it comes
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read it here, at most `max_bytes`, then hand it on.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nothing to answer, nothing half-read to run
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


@dataclass(frozen=True)
class NamedRequest:
    """A named query's request, checked: what `QueryService.named` is asked."""

    params: dict[str, str]
    fmt: str
    limit: int
    offset: int
    wait_ms: int
    min_lsn: int | None


def parse_named_request(
    service: QueryService, pairs: list[tuple[str, str]], accept: str | None
) -> NamedRequest:
    """The query string's pairs (and the Accept header) of a named query's request, checked;
    InvalidParameters (400) when they are not right. One owner for both ways in."""
    given: dict[str, str] = {}
    repeated = set()
    for key, value in pairs:
        if key in given:
            repeated.add(key)
        given[key] = value
    if repeated:
        raise InvalidParameters(f"give each parameter once: {', '.join(sorted(repeated))}")
    return NamedRequest(
        params={k: v for k, v in given.items() if k not in RESERVED},
        fmt=choose_format(accept, given.get("format")),
        limit=parse_int("limit", given.get("limit"), 100, 1, service.limits.max_page),
        offset=parse_int("offset", given.get("offset"), 0, 0, 1 << 62),
        wait_ms=parse_int("wait_ms", given.get("wait_ms"), service.limits.wait_ms, 0, 60_000),
        min_lsn=parse_min_lsn(given.get("min_lsn")),
    )


@dataclass(frozen=True)
class _HitRequest:
    """A request the fast path has parsed and bound once (memoized by its raw form)."""

    name: str
    bound: dict[str, Any]
    request: NamedRequest


@dataclass(frozen=True)
class _Rendered:
    rows: Rows  # the cache entry it renders (by identity: a new entry is rendered anew)
    position: Any
    headers: list[tuple[bytes, bytes]]
    body: bytes


class CacheHits:
    """ASGI layer in front of FastAPI for `GET /queries/<name>` cache hits.

    A request is answered here only when all of this holds; else it goes on to FastAPI untouched
    (which answers it as always, and counts it):
      1. the path names a shipped query, and the token checks (`check_token`);
      2. its query string and Accept header parse as `answer_named` parses them
         (`parse_named_request`, memoized per raw request) and ask for JSON;
      3. `QueryService.cached`: the read models' position is known without a refresh and is at
         least `min_lsn` (read-your-writes: nothing to wait for), and the cache holds the result
         under that position;
      4. the response: the bytes `rows_response` makes for that answer (memoized per request,
         cache entry and position), and the same metrics (request count and latency by route,
         a cache hit) as the path through FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        service: QueryService,
        token: str,
        metrics: ApiMetrics,
        memo_entries: int = 10_000,
    ) -> None:
        self.app = app
        self.service = service
        self.token = token
        self.metrics = metrics
        self.memo_entries = memo_entries
        self._requests: dict[tuple[str, bytes, str | None], _HitRequest | None] = {}
        self._rendered: dict[tuple[str, bytes, str | None], _Rendered] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            started = time.perf_counter()
            hit = self._hit(scope)
            if hit is not None:
                await send({"type": "http.response.start", "status": 200, "headers": hit.headers})
                await send({"type": "http.response.body", "body": hit.body})
                route = scope["path"]  # the named query's route is its path
                self.metrics.requests.labels(route, "200").inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)
                return
        await self.app(scope, receive, send)

    def _hit(self, scope: Scope) -> _Rendered | None:
        path: str = scope["path"]
        if not path.startswith("/queries/") or path[9:] not in self.service.queries:
            return None  # 1.
        authorization = accept = None
        for header, value in scope["headers"]:
            if header == b"authorization":
                authorization = value.decode("latin-1")
            elif header == b"accept":
                accept = value.decode("latin-1")
        try:
            check_token(self.token, authorization)
        except QueryError:
            return None
        memo = (path, scope["query_string"], accept)  # 2.
        if memo in self._requests:
            parsed = self._requests[memo]
        else:
            parsed = self._parse(path[9:], scope["query_string"], accept)
            if len(self._requests) >= self.memo_entries:
                self._requests.clear()
            self._requests[memo] = parsed
        if parsed is None or parsed.request.fmt != "json":
            return None
        request = parsed.request
        answer = self.service.cached(  # 3.
            parsed.name, parsed.bound, request.limit, request.offset, request.min_lsn
        )
        if answer is None:
            return None
        rendered = self._rendered.get(memo)  # 4.
        if (
            rendered is None
            or rendered.rows is not answer.rows
            or (rendered.position != answer.watermark)
        ):
            response = rows_response(answer, "json")
            rendered = _Rendered(
                answer.rows, answer.watermark, response.raw_headers, bytes(response.body)
            )
            if len(self._rendered) >= self.memo_entries:
                self._rendered.clear()
            self._rendered[memo] = rendered
        return rendered

    def _parse(self, name: str, query_string: bytes, accept: str | None) -> _HitRequest | None:
        """None: not a well-formed request (FastAPI answers it, with its 400)."""
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        try:
            request = parse_named_request(self.service, pairs, accept)
            bound = self.service.queries[name].bind(request.params)
        except QueryError:
            return None
        return _HitRequest(name, bound, request)


def create_app(
    service: QueryService,
    token: str,
    ops_status: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    metrics = ApiMetrics()
    service.observe = metrics.observe
    app = FastAPI(
        title="cdc-projector query service",
        description="The read models over HTTP: named queries, read-your-writes, ad-hoc SQL.",
        version="1",
    )

    app.add_middleware(AuthAndMeasure, token=token, metrics=metrics)
    # a cache hit never reaches the middleware above or the router
    app.add_middleware(CacheHits, service=service, token=token, metrics=metrics)
    # added last, so outermost: no body beyond the limit is read, by anyone
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        details = [
            {"parameter": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
            for e in exc.errors()
        ]
        problems = "; ".join(f"{d['parameter']}: {d['problem']}" for d in details)
        return error_response(InvalidParameters(f"invalid request: {problems}", details))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = "no such endpoint; see /docs" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected failure answering %s %s", request.method, request.url.path)
        return JSONResponse(
            {
                "error": "internal",
                "message": f"the service failed: {type(exc).__name__}; see its log",
            },
            status_code=500,
        )

    # On the event loop itself (async): never queued behind requests that hold the worker
    # threads (waits for min_lsn, slow statements).
    @app.get("/health", summary="Liveness (no token needed).")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics of this service.")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/queries", summary="The named queries, with their parameters.")
    def list_queries() -> dict[str, Any]:
        return {"queries": service.describe()}

    def answer_named(name: str, request: Request) -> Response:
        asked = parse_named_request(
            service, request.query_params.multi_items(), request.headers.get("accept")
        )
        result = service.named(
            name, asked.params, asked.limit, asked.offset, asked.min_lsn, asked.wait_ms
        )
        if isinstance(result, Pending):
            return pending_response(result, service.limits.retry_after_s)
        return rows_response(result, asked.fmt)

    for query in service.queries.values():
        app.add_api_route(
            f"/queries/{query.name}",
            _named_endpoint(query.name, answer_named),
            methods=["GET"],
            summary=query.description,
            name=f"query_{query.name}",
            openapi_extra={"parameters": _openapi_parameters(query, service.limits.max_page)},
            responses={
                202: {
                    "description": "still processing: the read model has not reached "
                    "min_lsn; retry after Retry-After seconds"
                }
            },
        )

    @app.get("/queries/{name}", include_in_schema=False)
    def unknown_query(name: str, request: Request) -> Response:
        return answer_named(name, request)  # raises UnknownQuery with the list of names

    @app.post("/sql", summary="Ad-hoc read-only SQL, bounded in rows and time.")
    def adhoc_sql(body: SqlRequest, request: Request) -> Response:
        fmt = choose_format(request.headers.get("accept"), body.format)
        lines, position = service.sql(body.sql)
        content = csv_body(lines) if fmt == "csv" else json_body(None, lines, position, None)
        return Response(content, media_type=FORMATS[fmt], headers=watermark_headers(position))

    @app.get("/ops/status", summary="What the ops page shows.")
    def ops() -> dict[str, Any]:
        if ops_status is None:
            return {"available": False}
        return ops_status()

    @app.get("/", include_in_schema=False)
    def ops_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app


def _named_endpoint(name: str, answer: Callable[[str, Request], Response]) -> Any:
    def endpoint(request: Request) -> Response:
        return answer(name, request)

    endpoint.__name__ = f"query_{name}"
    return endpoint


def _openapi_parameters(query: NamedQuery, max_page: int) -> list[dict[str, Any]]:
    kinds = {int: "integer", str: "string"}
    params = []
    for p in query.parameters:
        schema: dict[str, Any] = {
            "type": kinds.get(PARAMETER_TYPES[p.clickhouse_type].python, "string")
        }
        if p.spec.choices:
            schema["enum"] = p.spec.choices
        if p.spec.default is not None:
            schema["default"] = p.spec.default
        params.append(
            {
                "name": p.name,
                "in": "query",
                "required": p.required,
                "description": f"{p.spec.description} ({p.clickhouse_type})",
                "schema": schema,
            }
        )
    params += [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": f"rows per page (1-{max_page})",
            "schema": {"type": "integer", "default": 100},
        },
        {
            "name": "offset",
            "in": "query",
            "required": False,
            "description": "rows to skip",
            "schema": {"type": "integer", "default": 0},
        },
        {
            "name": "min_lsn",
            "in": "query",
            "required": False,
            "description": "the writer's pg_current_wal_lsn() after its commit: wait until the read "
            "model shows it",
            "schema": {"type": "string"},
        },
        {
            "name": "wait_ms",
            "in": "query",
            "required": False,
            "description": "how long to wait for min_lsn (capped by the service)",
            "schema": {"type": "integer"},
        },
    ]
    return params


def watermark_headers(position: Any) -> dict[str, str]:
    headers = {}
    lsn = lsn_or_none(position.lsn)
    if lsn:
        headers["X-Watermark-LSN"] = lsn
    if position.watermark is not None:
        headers["X-Watermark-Tx"] = position.watermark.tx_id
    return headers


def rows_response(answer: Answer, fmt: str) -> Response:
    headers = watermark_headers(answer.watermark)
    headers["X-Cache"] = "hit" if answer.cached else "miss"
    if answer.next_offset is not None:
        headers["X-Next-Offset"] = str(answer.next_offset)
    if fmt == "csv":
        return Response(csv_body(answer.rows.lines), media_type=FORMATS["csv"], headers=headers)
    page = {"limit": answer.limit, "offset": answer.offset, "next_offset": answer.next_offset}
    body = json_body(answer.query, answer.rows.lines, answer.watermark, page)
    return Response(body, media_type=FORMATS["json"], headers=headers)


def pending_response(pending: Pending, retry_after_s: int) -> Response:
    body = {
        "status": "processing",
        "query": pending.query,
        "message": f"the read model has not reached min_lsn yet; retry after {retry_after_s} s",
        "min_lsn": lsn_or_none(pending.min_lsn),
        "watermark": watermark_body(pending.watermark),
    }
    headers = watermark_headers(pending.watermark) | {"Retry-After": str(retry_after_s)}
    return JSONResponse(body, status_code=202, headers=headers)


def error_response(exc: QueryError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, Busy):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
