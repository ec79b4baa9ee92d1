"""Two ClickHouse backends behind one small interface, running the very same SQL text.

- `ChdbBackend`: the ClickHouse engine in-process (chDB) on a data directory. The default.
- `ServerBackend`: a ClickHouse server over HTTP (clickhouse-connect).

Inserts are `INSERT INTO t (cols) SETTINGS insert_deduplication_token = '...' FORMAT JSONEachRow`
followed by the rows, as one statement text: chDB runs it as is, the server receives it as the
HTTP body. So both paths parse values with the same ClickHouse input format.

Both also run the fast path's SQL over raw message bytes (`over_avro`, the SQL is
projector/replicas/fast_path.py's): chDB reads the bytes from files, a server receives them with the
statement as external data (temporary tables that live for that one request).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar

from projector.errors import ClickHouseUnavailable, StatementRejected
from projector.redaction import redact

T = TypeVar("T")


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ident(name: str) -> str:
    """A ClickHouse identifier (backquoted)."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def insert_statement(
    table: str, columns: list[str], rows: Iterable[Mapping[str, Any]], token: str
) -> str:
    body = "\n".join(
        json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_exact_text)
        for row in rows
    )
    cols = ", ".join(ident(c) for c in columns)
    return (
        f"INSERT INTO {table} ({cols}) SETTINGS insert_deduplication_token = {quote(token)}, "
        "input_format_skip_unknown_fields = 0 FORMAT JSONEachRow\n" + body
    )


# No statement grows with the data: a list of literals built from data (an `IN (...)` list of
# keys, offsets, ranges) is cut into groups of at most this many bytes, well under ClickHouse's
# `max_query_size` (262,144 bytes by default, which counts the whole statement text: a server
# admin may lower it, so leave room for the rest of the statement). Rows themselves travel as
# insert data (`insert_statement`), which `max_query_size` does not count.
LITERAL_LIST_BYTES = 64 * 1024


def literal_chunks(
    values: Sequence[T], literal: Callable[[T], str] = str, budget: int = LITERAL_LIST_BYTES
) -> Iterator[list[T]]:
    """`values`, in order, in consecutive groups whose SQL texts (`literal` of each), joined by
    `', '`, take at most `budget` bytes; a value whose text is longer is a group of its own."""
    group: list[T] = []
    size = 0
    for value in values:
        length = len(literal(value).encode()) + 2  # with its ", "
        if group and size + length > budget:
            yield group
            group, size = [], 0
        group.append(value)
        size += length
    if group:
        yield group


def _exact_text(value: Any) -> str:
    """Decimals (as read back by `rows`) travel as text: ClickHouse parses them exactly."""
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot send {type(value).__name__} to ClickHouse")


def escape_param(text: str) -> str:
    """A query parameter's value as ClickHouse reads it: in the escaped text form of its type
    (the form of TSV fields), so a backslash, tab or newline inside a string survives whole.
    The value is data, never SQL: ClickHouse parses it as the `{name:Type}` placeholder's type."""
    return (
        text.replace("\\", "\\\\")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace("\0", "\\0")
    )


def parse_rows(text: str) -> list[dict[str, Any]]:
    """JSONEachRow output, with every non-integer number as an exact Decimal (never a float)."""
    return [json.loads(line, parse_float=Decimal) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Topology:
    """Where the projector's tables live, and so how their DDL reads: one ClickHouse (chDB or a
    server), or a cluster named in `remote_servers` (setting `clickhouse_cluster`). The one owner of
    engines, `ON CLUSTER` and the insert-deduplication settings every table needs.

    On a cluster (one shard, any number of replicas: every replica holds every table whole, so
    `FINAL` and the checkpoint reads stay exact on whichever replica answers):
      - DDL runs `ON CLUSTER`, so every replica gets the same table, column or view;
      - engines are `Replicated*MergeTree` with the conventional Keeper path
        `/clickhouse/tables/{shard}/{database}/{table}` and replica name `{replica}` (macros each
        server defines in its config);
      - insert deduplication is Keeper's: the block ids of token-ed inserts are kept per table in
        Keeper, so a batch replayed by another projector process, through another replica, is
        dropped exactly as on one server (`replicated_deduplication_window`).
    On one ClickHouse, deduplication of plain MergeTree tables must be switched on per table
    (`non_replicated_deduplication_window`)."""

    cluster: str | None = None
    # Token-ed inserts remembered per table. A replay only ever repeats the last open intent of a
    # partition, but DLQ replays and rebuilds repeat older ranges: keep a generous window.
    dedup_window: int = 100_000
    replicated_dedup_window: int = 10_000  # each entry is a Keeper node: keep it smaller

    def on_cluster(self) -> str:
        return "" if self.cluster is None else f" ON CLUSTER {ident(self.cluster)}"

    def create_database(self, database: str) -> str:
        return f"CREATE DATABASE IF NOT EXISTS {ident(database)}{self.on_cluster()}"

    def engine(self, family: str, args: str = "") -> str:
        """`ReplacingMergeTree(_version)` or, on a cluster, its replicated form."""
        if self.cluster is None:
            return f"{family}({args})" if args else family
        path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
        return f"Replicated{family}({path}{', ' + args if args else ''})"

    def dedup_setting(self, deduplicate: bool = True) -> str:
        if self.cluster is None:
            return (
                f"non_replicated_deduplication_window = {self.dedup_window if deduplicate else 0}"
            )
        window = self.replicated_dedup_window if deduplicate else 0
        return f"replicated_deduplication_window = {window}"

    def create_table(
        self,
        qualified: str,
        columns: list[str],
        family: str,
        args: str,
        order_by: str,
        deduplicate: bool = True,
        settings: str = "",
        partition_by: str = "",
    ) -> str:
        """CREATE TABLE IF NOT EXISTS with the engine of `family`; insert deduplication on, or
        explicitly off (a table whose re-inserted rows must always land); `settings`: more
        table settings."""
        partition = f" PARTITION BY {partition_by}" if partition_by else ""
        return (
            f"CREATE TABLE IF NOT EXISTS {qualified}{self.on_cluster()} ({', '.join(columns)}) "
            f"ENGINE = {self.engine(family, args)}{partition} ORDER BY {order_by} "
            f"SETTINGS {self.dedup_setting(deduplicate)}{', ' + settings if settings else ''}"
        )

    def alter_table(self, qualified: str, action: str) -> str:
        return f"ALTER TABLE {qualified}{self.on_cluster()} {action}"

    def create_or_replace_view(self, qualified: str, select: str) -> str:
        return f"CREATE OR REPLACE VIEW {qualified}{self.on_cluster()} AS {select}"

    def sync_replica(self, qualified: str) -> str | None:
        """What to run before reading state another process wrote through another replica (the
        checkpoints, on assignment): this replica first fetches every part Keeper knows of, so a
        member never resumes from a checkpoint older than the one the previous owner recorded.
        Nothing on one ClickHouse."""
        return None if self.cluster is None else f"SYSTEM SYNC REPLICA {qualified}"


# In SQL given to `over_avro`: the tables of the given message bytes and of their offsets.
AVRO_SOURCE = "__projector_avro_source__"
OFFSETS_SOURCE = "__projector_offsets_source__"
OFFSETS_STRUCTURE = "kafka_offset UInt64"


# A query parameter's value as text in the form ClickHouse reads for its type (`2026-01-31`,
# `42`, `O'Brien`), or None for NULL.
ParamValue = str | None


class ClickHouse(Protocol):
    topology: Topology

    def execute(self, sql: str) -> None: ...

    def rows(self, sql: str) -> list[dict[str, Any]]: ...

    def text(self, sql: str, fmt: str) -> str: ...


class ParameterisedClickHouse(ClickHouse, Protocol):
    """A backend that binds query parameters: `{name:Type}` placeholders in `sql`, values given
    apart from the SQL text and parsed by ClickHouse as that type. The one way user-supplied values
    reach a query (the query service, `projector query`); never string interpolation."""

    def query(self, sql: str, fmt: str, params: Mapping[str, ParamValue]) -> str: ...


class ChdbBackend:
    """chDB allows one session per process; the projector holds it for its lifetime."""

    def __init__(self, path: str) -> None:
        from chdb import session

        self.topology = Topology()  # one process, one engine: never a cluster
        self._session = session.Session(path)
        self._lock = threading.Lock()
        self._registry_url: str | None = None  # the session's format_avro_schema_registry_url
        shm = Path("/dev/shm")  # message bytes for `over_avro` stay in memory where possible
        self._scratch = Path(
            tempfile.mkdtemp(prefix="projector-avro-", dir=shm if shm.is_dir() else None)
        )

    def _run(self, sql: str, fmt: str = "CSV") -> Any:
        with self._lock:
            return self._session.query(sql, fmt)

    def execute(self, sql: str) -> None:
        self._run(sql)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        out = self._run(sql, "JSONEachRow")
        text = out.bytes().decode() if hasattr(out, "bytes") else str(out)
        return parse_rows(text)

    def text(self, sql: str, fmt: str) -> str:
        out = self._run(sql, fmt)
        return out.bytes().decode() if hasattr(out, "bytes") else str(out)

    def query(self, sql: str, fmt: str, params: Mapping[str, ParamValue]) -> str:
        """chDB's session binds `{name:Type}` placeholders itself; values go in escaped text form."""
        bound = {k: "\\N" if v is None else escape_param(v) for k, v in params.items()}
        with self._lock:
            out = self._session.query(sql, fmt, params=bound)
        return out.bytes().decode() if hasattr(out, "bytes") else str(out)

    def over_avro(
        self,
        sql: str,
        data: bytes,
        registry_url: str,
        *,
        sample: bytes,
        offsets: bytes = b"",
        fmt: str = "CSV",
    ) -> str:
        """Run `sql`, in which `AVRO_SOURCE` is a table of `data` (concatenated Confluent-framed
        Avro messages of one writer schema, decoded by ClickHouse with the schema from the
        registry) and `OFFSETS_SOURCE` a table of `offsets` (little-endian UInt64s, column
        `kafka_offset`). One thread reads each in order, so `rowNumberInAllBlocks()` pairs them
        up. The engine infers the columns from the data itself (`sample`, one of the messages, is
        for a server). A statement ClickHouse refuses raises `StatementRejected`."""
        sources = {
            AVRO_SOURCE: (data, "'AvroConfluent'"),
            OFFSETS_SOURCE: (offsets, f"'RowBinary', {quote(OFFSETS_STRUCTURE)}"),
        }
        for marker, (content, format_args) in sources.items():
            path = self._scratch / marker
            path.write_bytes(content)
            sql = sql.replace(marker, f"file({quote(str(path))}, {format_args})")
        try:
            self._use_registry(registry_url)
            return self.text(sql + " SETTINGS max_threads = 1", fmt)
        except RuntimeError as exc:  # chDB reports every query error so
            raise StatementRejected(redact(str(exc).strip())) from exc
        finally:
            for marker in sources:
                (self._scratch / marker).unlink(missing_ok=True)

    def _use_registry(self, registry_url: str) -> None:
        """The registry as a setting of the session, set once: a URL with a password then appears
        in no statement the fast path runs (nor in the errors that quote one)."""
        if registry_url != self._registry_url:
            self.execute(f"SET format_avro_schema_registry_url = {quote(registry_url)}")
            self._registry_url = registry_url

    def close(self) -> None:
        self._session.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


class ServerBackend:
    def __init__(self, url: str, user: str, password: str, cluster: str | None = None) -> None:
        import clickhouse_connect

        self.topology = Topology(cluster)
        try:
            # No session: the apply thread and the main thread may query at the same time.
            self._client = clickhouse_connect.get_client(
                dsn=url, username=user, password=password, autogenerate_session_id=False
            )
        except Exception as exc:
            raise ClickHouseUnavailable(
                redact(f"ClickHouse server at {url} is unreachable: {exc}")
            ) from exc
        self.url = url
        self._structures: dict[tuple[bytes, str], str] = {}  # see _avro_structure

    def execute(self, sql: str) -> None:
        try:
            self._client.command(sql)
        except Exception as exc:
            raise _classify(exc, self.url) from exc

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return parse_rows(self.text(sql, "JSONEachRow"))

    def text(self, sql: str, fmt: str) -> str:
        try:
            return bytes(self._client.raw_query(sql, fmt=fmt)).decode()
        except Exception as exc:
            raise _classify(exc, self.url) from exc

    def query(self, sql: str, fmt: str, params: Mapping[str, ParamValue]) -> str:
        """clickhouse-connect sends the values as `param_<name>` (server-side binding; it escapes
        text values itself)."""
        try:
            return bytes(self._client.raw_query(sql, parameters=dict(params), fmt=fmt)).decode()
        except Exception as exc:
            raise _classify(exc, self.url) from exc

    def over_avro(
        self,
        sql: str,
        data: bytes,
        registry_url: str,
        *,
        sample: bytes,
        offsets: bytes = b"",
        fmt: str = "CSV",
    ) -> str:
        """`ChdbBackend.over_avro` on a server: `data` and `offsets` travel with the statement as
        external data (one request, `multipart/form-data`), so `AVRO_SOURCE` and `OFFSETS_SOURCE`
        are temporary tables the server fills, each read in order by one thread, before it runs
        the statement. The server fetches the writer schema from `registry_url` itself, so it
        must reach the registry at that address. External data needs its columns spelled out:
        they are what the server infers from `sample`, one message of `data` (asked once per
        writer schema)."""
        from clickhouse_connect.driver.external import ExternalData

        settings = {"format_avro_schema_registry_url": registry_url, "max_threads": 1}
        external = ExternalData(
            file_name=AVRO_SOURCE,
            data=data,
            fmt="AvroConfluent",
            structure=self._avro_structure(sample, registry_url),
        )
        if offsets:
            external.add_file(
                file_name=OFFSETS_SOURCE, data=offsets, fmt="RowBinary", structure=OFFSETS_STRUCTURE
            )
        return self._rejectable(sql, fmt, settings, external)

    def _avro_structure(self, sample: bytes, registry_url: str) -> str:
        """The columns the server reads a message of `sample`'s writer schema as (its own schema
        inference, the same the embedded engine applies to a file), cached per schema id."""
        cache_key = (sample[:5], registry_url)
        if cache_key not in self._structures:
            literal = "'" + "".join(f"\\x{byte:02X}" for byte in sample) + "'"
            described = self._rejectable(
                f"DESCRIBE format('AvroConfluent', {literal})",
                "JSONEachRow",
                {
                    "format_avro_schema_registry_url": registry_url,
                    "max_query_size": len(literal) + 1000,
                },
            )
            self._structures[cache_key] = ", ".join(
                f"{ident(column['name'])} {column['type']}" for column in parse_rows(described)
            )
        return self._structures[cache_key]

    def _rejectable(
        self, sql: str, fmt: str, settings: dict[str, Any], external: Any = None
    ) -> str:
        """`text` for a statement that may be refused: StatementRejected then, unless the
        server could not be reached (ClickHouseUnavailable)."""
        from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

        try:
            return bytes(
                self._client.raw_query(sql, fmt=fmt, settings=settings, external_data=external)
            ).decode()
        except OperationalError as exc:
            raise ClickHouseUnavailable(redact(f"ClickHouse server at {self.url}: {exc}")) from exc
        except DatabaseError as exc:
            raise StatementRejected(redact(str(exc).strip())) from exc

    def close(self) -> None:
        self._client.close()


def _classify(exc: Exception, url: str) -> Exception:
    from clickhouse_connect.driver.exceptions import OperationalError

    if isinstance(exc, OperationalError):
        return ClickHouseUnavailable(redact(f"ClickHouse server at {url}: {exc}"))
    return exc
