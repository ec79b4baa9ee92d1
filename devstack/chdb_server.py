"""`projector chdb-server`: one chDB engine shared by several projector processes, over HTTP.

chDB runs ClickHouse inside one process and a data directory belongs to one process at a time, so
N projector processes in one consumer group (scale-out) cannot each open it. A ClickHouse server
is the production answer (`PROJECTOR_BACKEND=server`); where none can be installed, as on the
development machines, this process plays its part: it owns the chDB directory and answers the
subset of ClickHouse's HTTP interface that clickhouse-connect (the projector's server backend)
uses — `POST /` with the statement in the `query` parameter and/or the body, `GET /ping` — running
each statement through the same engine, one at a time, with the output format the statement names
(`FORMAT Native` from clickhouse-connect) or `default_format`, with query parameters sent as
`param_<name>` (already in ClickHouse's escaped text form) bound by chDB. Errors come back as HTTP 500 with
ClickHouse's message, which clickhouse-connect raises as it would for a server.

Not a ClickHouse server: settings sent as URL parameters are ignored (the projector puts the ones
it needs into its statements), there are no users, sessions or compression, and it binds only
127.0.0.1.
"""

from __future__ import annotations

import logging
import signal
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("devstack.chdb_server")


class ChdbHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, path: Path) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self.session = session.Session(str(path))
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def run_statement(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> bytes:
        with self.lock:
            result = self.session.query(sql, fmt, params=params or None)
        return result.bytes() if hasattr(result, "bytes") else bytes(result)


class _Handler(BaseHTTPRequestHandler):
    server: ChdbHttpServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path in ("/ping", "/replicas_status"):
            self._send(200, b"Ok.\n")
            return
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        sql = "\n".join(part for part in (params.get("query", ""), body) if part)
        if not sql.strip():
            self._send(400, b"Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
            return
        try:
            bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
            out = self.server.run_statement(
                sql, params.get("default_format", "TabSeparated"), bound
            )
        except Exception as exc:  # ClickHouse's own message, as a server would send it
            self._send(500, str(exc).encode(), {"X-ClickHouse-Exception-Code": "1"})
            return
        self._send(200, out, {"Content-Type": "application/octet-stream"})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("X-ClickHouse-Summary", "{}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve(port: int, path: Path) -> None:
    server = ChdbHttpServer(port, path)
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("chDB at %s answers ClickHouse HTTP on http://127.0.0.1:%d", path, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server.session.close()
