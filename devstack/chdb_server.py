"""`projector chdb-server`: one chDB engine shared by several projector processes, over HTTP.

chDB runs ClickHouse inside one process and a data directory belongs to one process at a time, so
N projector processes in one consumer group (scale-out) cannot each open it. A ClickHouse server
is the production answer (`PROJECTOR_BACKEND=server`); where none can be installed, as on the
development machines, this process plays its part: it owns the chDB directory and answers the
subset of ClickHouse's HTTP interface that clickhouse-connect (the projector's server backend)
uses, the way a server answers it:

- `GET /ping`; `POST /` with the statement in the `query` parameter and/or the body (a server
  joins them with a line break), run with the output format the statement names (`FORMAT Native`
  from clickhouse-connect), `default_format`, or the header `X-ClickHouse-Format` (the Java
  client's); answers are never compressed (`compress=1` is not honoured);
- every other URL parameter is a setting for this one statement (`format_avro_schema_registry_url`,
  `max_threads`, `date_time_input_format`, ...), except the ones a server reserves for the HTTP
  layer (`query_id`, `wait_end_of_query`, `compress`, ...);
- external data (a `multipart/form-data` body): each file part becomes a temporary table named by
  the part, read with the format `<name>_format` (default TabSeparated) and the columns
  `<name>_structure` or `<name>_types` from the URL, with the statement's settings — so
  `AvroConfluent` parts are decoded with the registry the settings name; the statement may also
  come as a form field, and then the body carries no other data;
- errors as HTTP 500 with ClickHouse's message, which clickhouse-connect raises as it would for a
  server.

Not a ClickHouse server: statements run one at a time; one user, no sessions or compression; query
parameters (`param_*`, in the URL or as form fields) are bound by chDB itself; an INSERT's inline
data must be text (the body is decoded as UTF-8).

**Safe to leave running** (it runs as the user who started it, and chDB reads and writes files):
- it binds 127.0.0.1 only, and answers only requests whose `Host` is a loopback name: a page
  whose DNS name was rebound to 127.0.0.1 names its own host, and is refused;
- every request but `/ping` needs the password (`check_password`: HTTP Basic, ClickHouse's
  `X-ClickHouse-User`/`X-ClickHouse-Key` headers, or `user`/`password` URL parameters), which
  `projector stack up` generated into `.stack/chdb-server.password` (0600) and `client.env`;
- a request that carries an `Origin` header is refused: browsers add it to every cross-origin
  request but a GET (no ClickHouse client sends one), so a web page's `fetch(..., {mode:
  'no-cors'})` never runs a statement, whatever its body -- and a GET from a page (an image)
  cannot carry the password. Form-encoded bodies (a page's `<form>`) are refused too. Plain-text
  bodies are not: clickhouse-connect sends its statements as `text/plain`.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hmac
import logging
import re
import shutil
import signal
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("devstack.chdb_server")

# URL parameters a ClickHouse server reads for the HTTP layer, never as settings.
RESERVED_PARAMETERS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "compress",
        "decompress",
        "user",
        "password",
        "quota_key",
        "query_id",
        "stacktrace",
        "buffer_size",
        "wait_end_of_query",
        "session_id",
        "session_timeout",
        "session_check",
        "client_protocol_version",
        "close_session",
    }
)
EXTERNAL_DATA_SUFFIXES = ("_format", "_types", "_structure")  # reserved with external data only
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
# A body a web page's <form> posts, and no ClickHouse client sends.
REFUSED_CONTENT_TYPES = ("application/x-www-form-urlencoded",)


class Refused(Exception):
    """A request refused before it runs: (HTTP status, ClickHouse-style message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_request(headers: Any, params: dict[str, str], password: str) -> None:
    """The module docstring's rules for every request but `/ping`; raises `Refused`."""
    host = (headers.get("Host") or "").strip().lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name not in LOOPBACK_HOSTS:
        raise Refused(
            403,
            f"Code: 516. DB::Exception: requests for host {host!r} are refused: "
            "this server answers requests to 127.0.0.1 or localhost only",
        )
    if headers.get("Origin") is not None:
        raise Refused(
            403,
            "Code: 516. DB::Exception: requests from web pages (with an Origin header) are refused",
        )
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type in REFUSED_CONTENT_TYPES:
        raise Refused(
            415,
            f"Code: 516. DB::Exception: {content_type} bodies are refused "
            "(send the statement as the body, as ClickHouse clients do)",
        )
    if not check_password(headers, params, password):
        raise Refused(
            401,
            "Code: 516. DB::Exception: default: Authentication failed: password "
            "is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)",
        )


def check_password(headers: Any, params: dict[str, str], password: str) -> bool:
    """Whether the request carries `password` the way ClickHouse clients send one."""
    given: str | None = None
    authorization = headers.get("Authorization") or ""
    if authorization.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        given = decoded.partition(":")[2]
    elif headers.get("X-ClickHouse-Key") is not None:
        given = headers.get("X-ClickHouse-Key")
    elif "password" in params:
        given = params["password"]
    return given is not None and hmac.compare_digest(given.encode(), password.encode())


class BadRequest(Exception):
    """The request is not one a ClickHouse server would run (answered with HTTP 400)."""


@dataclass
class ExternalTable:
    name: str
    data: bytes
    format: str
    structure: str


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class ChdbHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, path: Path, password: str) -> None:
        from chdb import session

        if not password:
            raise ValueError("chdb-server needs a password")
        self.password = password
        path.mkdir(parents=True, exist_ok=True)
        self.session = session.Session(str(path))
        self.lock = threading.Lock()
        self.scratch = Path(tempfile.mkdtemp(prefix="chdb-server-"))
        # Settings this process has changed in the one chDB session, and their values before.
        self._applied: dict[str, str] = {}
        self._original: dict[str, str] = {}
        super().__init__(("127.0.0.1", port), _Handler)

    def run_statement(
        self,
        sql: str,
        fmt: str,
        settings: dict[str, str] | None = None,
        external: list[ExternalTable] | None = None,
        params: dict[str, str] | None = None,
    ) -> bytes:
        """Run one statement with `settings` and the `external` tables, as a server runs one
        request: the settings and tables exist for this statement only; `params` are the
        query parameters (`param_<name>`, in ClickHouse's escaped text form), bound by chDB."""
        with self.lock:
            self._apply_settings(settings or {})
            try:
                for table in external or []:
                    self._create_external_table(table)
                result = self.session.query(sql, fmt, params=params or None)
            finally:
                # Every table of the request goes, also one whose data failed to load (a client
                # killed mid-upload sends a cut body): left behind, it would refuse every later
                # request that names it ("Temporary table ... already exists").
                for table in external or []:
                    self.session.query(f"DROP TEMPORARY TABLE IF EXISTS {_ident(table.name)}")
        return result.bytes() if hasattr(result, "bytes") else bytes(result)

    def _apply_settings(self, settings: dict[str, str]) -> None:
        """Make the session's settings those of this request: the ones an earlier request changed
        and this one does not name go back to their values before (consecutive requests of one
        client send the same settings, so this is mostly nothing)."""
        for name in [n for n in self._applied if n not in settings]:
            self.session.query(f"SET {name} = {_quote(self._original[name])}")
            del self._applied[name]
        for name, value in settings.items():
            if self._applied.get(name) == value:
                continue
            if not SETTING_NAME.match(name):
                raise BadRequest(f"Code: 115. DB::Exception: Unknown setting '{name}'.")
            if name not in self._original:
                found = self.session.query(
                    f"SELECT value FROM system.settings WHERE name = {_quote(name)}", "TSVRaw"
                ).bytes()
                self._original[name] = found.decode().rstrip("\n")
            self.session.query(f"SET {name} = {_quote(value)}")  # an unknown name fails here
            self._applied[name] = value

    def _create_external_table(self, table: ExternalTable) -> None:
        """The temporary table a server makes of one part of external data: read in order by one
        thread, as a server reads the request body."""
        path = self.scratch / "external-data"
        path.write_bytes(table.data)
        try:
            self.session.query(f"DROP TEMPORARY TABLE IF EXISTS {_ident(table.name)}")
            self.session.query(
                f"CREATE TEMPORARY TABLE {_ident(table.name)} ({table.structure}) ENGINE = Memory"
            )
            self.session.query(
                f"INSERT INTO {_ident(table.name)} SELECT * FROM file({_quote(str(path))}, "
                f"{_quote(table.format)}, {_quote(table.structure)}) "
                "SETTINGS max_threads = 1, max_insert_threads = 1"
            )
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.server_close()
        self.session.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class _Handler(BaseHTTPRequestHandler):
    server: ChdbHttpServer
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: the headers and the body go out in two writes; with Nagle's algorithm the
    # body waited for the client's delayed ACK of the headers, 40 ms on every answer to a
    # keep-alive client (clickhouse-connect, httpx), most of a small statement's time.
    disable_nagle_algorithm = True

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
        try:
            check_request(self.headers, params, self.server.password)
        except Refused as refused:
            self.close_connection = True  # the body is not read
            self._send(refused.status, str(refused).encode())
            return
        body = self.rfile.read(length) if length else b""
        try:
            sql, external = self._statement(params, body)
        except (BadRequest, UnicodeDecodeError) as exc:
            self._send(400, str(exc).encode())
            return
        reserved = RESERVED_PARAMETERS  # `params` now holds the form's parameters too
        settings = {
            name: value
            for name, value in params.items()
            if name not in reserved
            and not name.startswith("param_")
            and not (external is not None and name.endswith(EXTERNAL_DATA_SUFFIXES))
        }
        if not sql.strip():
            self._send(400, b"Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
            return
        # The output format: `default_format`, or the header the ClickHouse Java client sends.
        fmt = (
            params.get("default_format")
            or self.headers.get("X-ClickHouse-Format")
            or "TabSeparated"
        )
        try:
            bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
            out = self.server.run_statement(sql, fmt, settings, external, bound)
        except BadRequest as exc:
            self._send(400, str(exc).encode())
            return
        except Exception as exc:  # ClickHouse's own message, as a server would send it
            self._send(500, str(exc).encode(), {"X-ClickHouse-Exception-Code": "1"})
            return
        self._send(200, out, {"Content-Type": "application/octet-stream"})

    def _statement(
        self, params: dict[str, str], body: bytes
    ) -> tuple[str, list[ExternalTable] | None]:
        """The statement text and, for a multipart body, its external tables."""
        content_type = self.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/form-data"):
            return "\n".join(
                part for part in (params.get("query", ""), body.decode()) if part
            ), None
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        query = params.get("query", "")
        external: list[ExternalTable] = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if not isinstance(name, str) or not isinstance(payload, bytes):
                continue
            if part.get_filename() is None:  # a form field: the statement, or a parameter
                if name == "query":
                    query += payload.decode()
                elif name.startswith("param_"):  # clickhouse-connect's long parameters
                    params[name] = payload.decode()
                continue
            if f"{name}_structure" in params:
                structure = params[f"{name}_structure"]
            elif f"{name}_types" in params:
                types = params[f"{name}_types"].split(",")
                structure = ", ".join(f"_{i} {t.strip()}" for i, t in enumerate(types, 1))
            else:
                raise BadRequest(
                    f"Code: 36. DB::Exception: Neither structure nor types have been provided "
                    f"for external table {name}. Use fields {name}_structure or {name}_types."
                )
            external.append(
                ExternalTable(
                    name, payload, params.get(f"{name}_format", "TabSeparated"), structure
                )
            )
        return query, external

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


PASSWORD_FILE = "chdb-server.password"


def stack_password(state_dir: Path) -> str:
    """The password of the local stack's chdb-server: `<state dir>/chdb-server.password`,
    generated (0600 from its creation) the first time it is asked for."""
    import secrets

    from devstack.secret_files import write_secret_file

    path = state_dir / PASSWORD_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if not found:
        state_dir.mkdir(parents=True, exist_ok=True)
        found = secrets.token_urlsafe(24)
        write_secret_file(path, found + "\n")
    return found


def serve(port: int, path: Path, password: str) -> None:
    server = ChdbHttpServer(port, path, password)
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("chDB at %s answers ClickHouse HTTP on http://127.0.0.1:%d", path, port)
    try:
        server.serve_forever()
    finally:
        server.close()
