"""The engine's commands: `run`, `status`, `sql`, `serve`, `query`, `dlq`, `connectors`.

`devstack/cli.py` adds the development tools (the local stack, the demo, the shop, benchmarks) to
this same `app` and is the `projector` entry point; the engine never imports them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from projector.clickhouse import ParameterisedClickHouse, ident
from projector.config import ProjectorConfig, client_environment, load_config
from projector.errors import ConfigError, ProjectorError
from projector.read_models.definitions import load_read_models
from projector.redaction import configure_logging, redact, redacting_excepthook
from schemas.errors import RegistryUnavailable

if TYPE_CHECKING:
    from connectors import ApplyPlan, ConnectClient, IdentityGap
    from projector.commit.finish_line import Finish
    from queries.server import BackgroundServer

app = typer.Typer(
    help="CDC projection engine: Postgres → Debezium → Kafka → ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    # A crash prints a plain traceback through `redacting_excepthook`: typer's own would show
    # local variables (a configuration holds passwords) and bypass the redaction.
    pretty_exceptions_enable=False,
)
sys.excepthook = redacting_excepthook

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {redact(message)}", highlight=False)
    raise typer.Exit(code)


# ---- projector ---------------------------------------------------------------------------------

ConfigOption = typer.Option(None, "--config", help="TOML file with projector settings.")
# Where the query service listens: the same flags on `serve` and `run --serve`.
QueryHostOption = typer.Option(
    None, "--host", help="Address the query service listens on (PROJECTOR_QUERY_HOST)."
)
QueryPortOption = typer.Option(
    None, "--port", min=1, max=65535, help="Port of the query service (PROJECTOR_QUERY_PORT)."
)


def _config(path: Path | None) -> ProjectorConfig:
    """The settings, with their read-model definitions checked: a broken definition file stops
    every command at start-up, not a batch."""
    try:
        config = load_config(path)
        load_read_models(config.read_models_file)
        return config
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise


@app.command("run")
def run(
    until_caught_up: bool = typer.Option(
        False,
        "--until-caught-up",
        help="Exit 0 once every change committed in Postgres when the command starts is applied "
        "(reads the source's WAL position: PROJECTOR_SOURCE_DSN, or the connector's PG_*/CDC_* "
        "settings; needs the transaction topic).",
    ),
    until_lsn: str | None = typer.Option(
        None,
        "--until-lsn",
        metavar="LSN",
        help="Exit 0 once every change committed in Postgres up to LSN is applied, e.g. a "
        "writer's SELECT pg_current_wal_lsn() after its commit (0/16B3748).",
    ),
    until_kafka_end: bool = typer.Option(
        False,
        "--until-kafka-end",
        help="Exit 0 once everything in Kafka when the command starts is applied (changes "
        "Debezium has not produced yet are not waited for).",
    ),
    serve_api: bool = typer.Option(
        False,
        "--serve",
        help="Also serve the query API and ops page from this process, through the projector's "
        "own ClickHouse (the way on chDB, which one process owns); at --host:--port, token "
        "PROJECTOR_API_TOKEN.",
    ),
    host: str | None = QueryHostOption,
    port: int | None = QueryPortOption,
    config_file: Path | None = ConfigOption,
) -> None:
    """Consume the change topics and apply them to ClickHouse (exactly-once effect); until
    stopped (Ctrl-C, SIGTERM), or until a finish line: docs/projector.md, "Finishing a run"."""
    import signal

    from projector.config import open_backend
    from projector.run.loop import Projector

    # A stop asked for while the run starts up (opening ClickHouse takes seconds) is honoured
    # once the projector exists, instead of killing the process half-way.
    stop_asked: list[int] = []
    for asked in (signal.SIGTERM, signal.SIGINT):
        signal.signal(asked, lambda *_: stop_asked.append(1))
    configure_logging()
    logging.getLogger("projector").info("projector run starting (SIGTERM or Ctrl-C stops it)")
    config = _config(config_file)
    try:
        # The moment the run is asked to finish is now: the finish is fixed before anything runs.
        finish = _finish(config, until_caught_up, until_lsn, until_kafka_end)
    except ConfigError as exc:
        fail(str(exc), code=2)
        return
    except ProjectorError as exc:
        fail(str(exc))
        return
    try:
        backend = open_backend(config)
        if (host or port) and not serve_api:
            fail("--host and --port are where --serve listens: add --serve", code=2)
        api = _start_api(config, backend, host, port) if serve_api else None
        try:
            projector = Projector(config, backend)
            if stop_asked:
                projector.request_stop()
            code = projector.run(finish)
        finally:
            if api is not None and api.stop():
                # Close the engine while this thread still owns it: left to interpreter exit,
                # chDB's shutdown raced the service's threads and crashed (SIGSEGV) at times.
                backend.close()
    except ProjectorError as exc:
        fail(str(exc))
        return
    raise typer.Exit(code)


def _finish(
    config: ProjectorConfig, until_caught_up: bool, until_lsn: str | None, until_kafka_end: bool
) -> Finish | None:
    """The finish line the options ask for (projector/commit/finish_line.py), None: run until stopped."""
    from projector.commit.finish_line import Finish, source_position
    from projector.commit.ledger import parse_lsn

    chosen = [until_caught_up, until_lsn is not None, until_kafka_end]
    if sum(chosen) > 1:
        raise ConfigError("give at most one of --until-caught-up, --until-lsn, --until-kafka-end")
    if until_kafka_end:
        return Finish(kafka_end=True)
    if not (until_caught_up or until_lsn is not None):
        return None
    if not config.transaction_metadata:
        raise ConfigError(
            f"--until-{'caught-up' if until_caught_up else 'lsn'} follows Debezium's transaction "
            "topic, and PROJECTOR_TRANSACTION_METADATA is false: turn it on, or use "
            "--until-kafka-end (everything in Kafka now)"
        )
    lsn = source_position(config.source_dsn) if until_lsn is None else parse_lsn(until_lsn)
    return Finish(lsn=lsn)


def _start_api(
    config: ProjectorConfig, backend: ParameterisedClickHouse, host: str | None, port: int | None
) -> BackgroundServer:
    """`run --serve`: the query service on a thread, sharing the projector's backend object."""
    from queries.server import BackgroundServer

    api = BackgroundServer(config, backend, host or config.query_host, port or config.query_port)
    api.start()
    return api


@app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: bool = typer.Option(
        False, "--watch", help="Redraw every --interval seconds (Ctrl-C ends)."
    ),
    interval: float = typer.Option(2.0, min=0.2, help="Seconds between redraws with --watch."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Every projection on one line — replica tables and read models: state (live, stopped,
    building or rebuilding n%, failed), watermark and its age, lag in events and seconds, dead
    letters, last error — then the replication slot (active, WAL it retains) and the connector
    with its tasks. Read from the running projector's metrics endpoint when it answers, and from
    ClickHouse (with chDB: while no projector runs)."""
    from projector.operations.status import status_report

    config = _config(config_file)

    def report() -> dict[str, Any]:
        try:
            return status_report(config)
        except ProjectorError as exc:
            fail(str(exc))
            raise

    if as_json:
        sys.stdout.write(json.dumps(report(), indent=2, default=str) + "\n")
        return
    out = Console() if sys.stdout.isatty() else Console(width=140)  # a pipe or a log: wide
    if not watch:
        out.print(_status_view(report()))
        return
    from rich.live import Live

    try:
        with Live(_status_view(report()), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_status_view(report()), refresh=True)
    except KeyboardInterrupt:
        pass


def _status_view(report: dict[str, Any]) -> Any:
    """`projector status` as rich renderables: the projections, the source side, the totals."""
    from rich.console import Group
    from rich.text import Text

    live = report["source"] != "clickhouse"
    head = Text(f"from {'the running projector at ' if live else ''}{report['source']}")
    projections = Table(title="projections", title_justify="left")
    projections.add_column("projection", overflow="fold", min_width=16)  # folds, never cuts
    for name in ("kind", "state", "watermark", "age"):
        projections.add_column(name, overflow="fold")
    for name in ("lag", "lag s", "DLQ"):
        projections.add_column(name, justify="right")
    projections.add_column("last error", overflow="fold")
    for row in report.get("projections", []):
        age = row.get("watermark_age_s")
        seconds = row.get("lag_seconds")
        projections.add_row(
            row["name"], row["kind"].replace("read model", "model"), row["state"], row.get("watermark_lsn") or "-",
            "-" if age is None else f"{age:.1f}s", f"{row['lag_events']:,}",
            "-" if seconds is None else f"{seconds:.1f}", str(row["dead_letters"]),
            row.get("last_error") or "",
        )  # fmt: skip
    side = report.get("source_side", {})
    slot, connector = side.get("replication_slot", {}), side.get("connector", {})
    source = Table(title="source", title_justify="left", show_header=False)
    source.add_column(overflow="fold")
    source.add_column(overflow="fold")
    if "retained_wal_bytes" in slot:
        from projector.operations.status import format_bytes

        text = (f"{slot['name']}: {slot['state']}, retains "
                f"{format_bytes(slot['retained_wal_bytes'] or 0)} of WAL")  # fmt: skip
        source.add_row(
            "replication slot",
            text + (f"\nWARNING: {slot['warning']}" if slot.get("warning") else ""),
        )
    else:
        source.add_row("replication slot", _unreadable(slot))
    if "tasks" in connector:
        tasks = ", ".join(connector["tasks"]) or "no task"
        source.add_row("connector", f"{connector['name']}: {connector['state']} (tasks: {tasks})")
        if connector.get("failure"):
            source.add_row("", connector["failure"])
    else:
        source.add_row("connector", _unreadable(connector))
    extra: list[Any] = []
    if live and report.get("tables"):
        tables = Table(
            "table", "path", "events applied", title="this process", title_justify="left"
        )
        for row in report["tables"]:
            tables.add_row(row["table"], row["path"], f"{row['events']:,}")
        extra.append(tables)
    dead = Text(f"{report['dead_letters']} dead letter(s)")
    return Group(head, projections, *extra, source, dead)


def _unreadable(answer: dict[str, Any]) -> str:
    return " ".join(str(answer.get(k)) for k in ("state", "note", "error", "name") if answer.get(k))


def _write_rows(lines: list[str], fmt: str) -> None:
    """JSONEachRow lines as `table`, `csv` or `json` (the lines themselves)."""
    from queries.service import csv_body

    if fmt == "json":
        sys.stdout.writelines(line + "\n" for line in lines)
    elif fmt == "csv":
        sys.stdout.write(csv_body(lines).decode())
    else:
        rows = [json.loads(line) for line in lines]
        table = Table(*(rows[0] if rows else []))
        for row in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in row.values()))
        Console().print(table)
        console.print(f"{len(rows)} row(s)", highlight=False)


FormatOption = typer.Option(
    "table", "--format", "-f", help="table | csv | json (one object per line)"
)


@app.command("sql")
def sql(
    query: str = typer.Argument(
        ..., help='One read-only SELECT, e.g. "SELECT * FROM replica_public.orders FINAL".'
    ),
    fmt: str = FormatOption,
    max_rows: int = typer.Option(1_000_000, min=1, help="Refuse results with more rows."),
    max_seconds: float = typer.Option(300.0, min=0.1, help="Stop the query after this long."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Run one read-only SELECT on the configured ClickHouse, checked the way the query
    service's POST /sql checks it (queries/adhoc.py): ClickHouse's parser, readonly = 1, limits."""
    from projector.config import open_backend
    from queries.adhoc import run_read_only
    from queries.errors import QueryError
    from queries.server import sql_limits

    if fmt not in ("table", "csv", "json"):
        fail("--format must be one of table, csv, json", code=2)
    try:
        config = _config(config_file)
        backend = open_backend(config)
    except ProjectorError as exc:
        fail(str(exc))
        return
    # The operator's command: any database, the engine's limits of memory and bytes, and the
    # rows and time asked for; the functions ad-hoc SQL may use are the same as POST /sql's.
    limits = replace(sql_limits(config), max_rows=max_rows, max_seconds=max_seconds,
                     max_result_bytes=max(sql_limits(config).max_result_bytes, 1024**3))  # fmt: skip
    try:
        lines = run_read_only(backend, query, limits)
    except QueryError as exc:
        fail(exc.message, code=2 if exc.status < 500 else 1)
        return
    _write_rows(lines, fmt)


@app.command("serve")
def serve(
    host: str | None = QueryHostOption,
    port: int | None = QueryPortOption,
    config_file: Path | None = ConfigOption,
) -> None:
    """Serve the read models over HTTP: named queries, read-your-writes, ad-hoc SQL, metrics, and
    the ops page at /. Needs PROJECTOR_API_TOKEN. For a ClickHouse server
    (PROJECTOR_BACKEND=server); on chDB use `projector run --serve` instead."""
    from projector.config import open_backend
    from queries.server import serve as run_server

    configure_logging()
    config = _config(config_file)
    try:
        run_server(config, open_backend(config), host or config.query_host,
                   port or config.query_port)  # fmt: skip
    except ProjectorError as exc:
        fail(str(exc))


@app.command("query")
def query(
    name: str = typer.Argument(..., help="A named query, or `list` for all of them and their parameters."),
    param: list[str] = typer.Option([], "--param", "-p", help="A parameter as k=v (repeat)."),
    fmt: str = FormatOption,
    limit: int = typer.Option(100, min=1, help="Rows per page."),
    offset: int = typer.Option(0, min=0, help="Rows to skip."),
    min_lsn: str | None = typer.Option(
        None, help="Wait until the read model shows everything committed up to this LSN."
    ),
    url: str | None = typer.Option(
        None, envvar="PROJECTOR_API_URL",
        help="Ask a running query service (e.g. http://127.0.0.1:18000; token from "
        "PROJECTOR_API_TOKEN) instead of opening ClickHouse here: the way while "
        "`projector run --serve` holds a chDB directory.",
    ),
    config_file: Path | None = ConfigOption,
) -> None:  # fmt: skip
    """Run a named query (queries/sql/NAME.sql), as GET /queries/NAME does. `projector query
    list` prints every query and its parameters."""
    from queries.errors import QueryError

    if fmt not in ("table", "csv", "json"):
        fail("--format must be one of table, csv, json", code=2)
    params = {}
    for item in param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param takes k=v, got {item!r}", code=2)
        params[key.strip()] = value
    config = _config(config_file)
    try:
        if url:
            lines, watermark = _query_over_http(url, config, name, params, limit, offset, min_lsn)
        else:
            lines, watermark = _query_here(config, name, params, limit, offset, min_lsn)
    except QueryError as exc:
        fail(exc.message, code=2 if exc.status < 500 else 1)
        return
    except ProjectorError as exc:
        fail(str(exc))
        return
    if name != "list":
        console.print(f"watermark: {watermark or 'none yet'}", highlight=False)
    _write_rows(lines, fmt)


def _query_here(
    config: ProjectorConfig, name: str, params: dict[str, str], limit: int, offset: int,
    min_lsn: str | None,
) -> tuple[list[str], str | None]:  # fmt: skip
    from projector.config import open_backend
    from queries.server import build_service
    from queries.service import Pending, parse_min_lsn

    service = build_service(config, open_backend(config))
    if name == "list":
        return [json.dumps(q) for q in _query_list(service.describe())], None
    if limit > service.limits.max_page:
        fail(f"--limit is at most {service.limits.max_page}", code=2)
    result = service.named(name, params, limit, offset, parse_min_lsn(min_lsn))
    if isinstance(result, Pending):
        fail(f"still processing: the read model is at {result.watermark.lsn_text}, not yet at "
             f"{min_lsn}; try again", code=3)  # fmt: skip
        raise AssertionError
    return result.rows.lines, result.watermark.lsn_text if result.watermark.lsn else None


def _query_list(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"query": q["name"], "description": q["description"],
         "parameters": ", ".join(f"{p['name']} {p['type']}" + ("" if p["required"] else " (optional)")
                                 for p in q["parameters"])}
        for q in described
    ]  # fmt: skip


def _query_over_http(
    url: str, config: ProjectorConfig, name: str, params: dict[str, str], limit: int,
    offset: int, min_lsn: str | None,
) -> tuple[list[str], str | None]:  # fmt: skip
    import httpx

    from queries.errors import QueryError

    headers = {"Authorization": f"Bearer {config.api_token or ''}"}
    try:
        if name == "list":
            found = httpx.get(f"{url.rstrip('/')}/queries", headers=headers, timeout=30)
        else:
            query_params = {**params, "limit": str(limit), "offset": str(offset)}
            if min_lsn:
                query_params["min_lsn"] = min_lsn
            found = httpx.get(f"{url.rstrip('/')}/queries/{name}", params=query_params,
                              headers=headers, timeout=90)  # fmt: skip
    except httpx.HTTPError as exc:
        raise ProjectorError(f"the query service at {url} does not answer: {exc}") from exc
    body = found.json()
    if found.status_code == 202:
        fail(f"still processing: {body['message']} (watermark {body['watermark']['lsn']})", code=3)
    if found.status_code >= 400:
        error = QueryError(body.get("message", found.text))
        error.status = found.status_code
        raise error
    if name == "list":
        return [json.dumps(q) for q in _query_list(body["queries"])], None
    return [json.dumps(row) for row in body["rows"]], body["watermark"]["lsn"]


dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    limit: int = typer.Option(50, help="At most this many."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json (one object per line)"),
    config_file: Path | None = ConfigOption,
) -> None:
    """Dead letters not yet replayed: where they came from and why they failed."""
    from projector.commit.dead_letters import DeadLetterStore
    from projector.config import open_backend

    if fmt not in ("table", "json"):
        fail("--format must be table or json", code=2)
    config = _config(config_file)
    store = DeadLetterStore(open_backend(config), config.control_database)
    store.create()
    letters = store.list(limit)
    if fmt == "json":
        sys.stdout.writelines(json.dumps(letter) + "\n" for letter in letters)
        return
    table = Table()
    table.add_column("topic", overflow="fold", min_width=16)  # folds, never cuts (as status)
    for name in ("partition", "offset", "stage"):
        table.add_column(name)
    table.add_column("error", overflow="fold")
    table.add_column("dead at")
    for row in letters:
        table.add_row(
            row["topic"],
            str(row["partition"]),
            str(row["offset"]),
            row["stage"],
            row["error"][:120],
            row["dead_at"],
        )
    (Console() if sys.stdout.isatty() else Console(width=140)).print(table)  # a pipe: wide
    console.print(f"{store.count()} dead letter(s) waiting", highlight=False)


@dlq_app.command("show")
def dlq_show(
    topic: str, partition: int, offset: int, config_file: Path | None = ConfigOption
) -> None:
    """One dead letter in full (bytes base64-encoded)."""
    from projector.commit.dead_letters import DeadLetterStore
    from projector.config import open_backend

    config = _config(config_file)
    store = DeadLetterStore(open_backend(config), config.control_database)
    store.create()
    letter = store.get(topic, partition, offset)
    if letter is None:
        fail(f"no dead letter at {topic}[{partition}]@{offset}", code=2)
    sys.stdout.write(json.dumps(letter, indent=2) + "\n")


@dlq_app.command("replay")
def dlq_replay(
    topic: str | None = typer.Option(None, help="Only the dead letters of this topic."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Try waiting dead letters again (after a fix or an upcaster); the ones that apply now
    leave the queue, the others stay. Exits 1 while any stays."""
    from projector.config import open_backend
    from projector.operations.dlq_replay import replay_dead_letters

    configure_logging(logging.WARNING)  # a letter that fails again says why
    config = _config(config_file)
    try:
        replayed, still_dead = replay_dead_letters(config, open_backend(config), topic)
    except (ProjectorError, RegistryUnavailable) as exc:  # nothing replayed is lost: run again
        fail(f"{exc} (the letters not replayed yet stay in the DLQ; run it again)")
        return
    console.print(f"replayed {replayed}, still dead {still_dead}", highlight=False)
    if still_dead:
        raise typer.Exit(1)


table_app = typer.Typer(help="One replica table at a time.", no_args_is_help=True)
app.add_typer(table_app, name="table")


@table_app.command("reset")
def table_reset(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    snapshot: bool = typer.Option(True, help="Ask Debezium for a snapshot of it (ADMIN_DSN)."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Rebuild a stopped table (its topic was re-created or re-partitioned, or its key schema
    changed): drop its replica, resume its topic at the end, and re-snapshot it through Debezium.
    Stop every `projector run` first."""
    from confluent_kafka import Consumer, TopicPartition

    from connectors.source import request_incremental_snapshot
    from projector.clickhouse import ident
    from projector.commit.checkpoint import PROJECTION, CheckpointStore
    from projector.config import open_backend
    from projector.replicas.snapshot_sweep import SnapshotSweep
    from projector.replicas.topic_guard import TopicGuard, reset_table

    config = _config(config_file)
    schema, _, name = table.partition(".")
    if not schema or not name:
        fail(f"{table!r}: give the source table as SCHEMA.TABLE", code=2)
    topic = f"{config.topic_prefix}.{schema}.{name}"
    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": config.group_id})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            fail(f"Kafka has no topic {topic}", code=2)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in metadata.partitions
        }
    finally:
        consumer.close()
    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    checkpoints.create()
    guard = TopicGuard(ch, config.control_database, PROJECTION, lambda _: None)
    guard.create()
    sweep = SnapshotSweep(ch, config.control_database, PROJECTION, lambda _: None)
    sweep.create()
    replica = f"{ident(config.replica_prefix + schema)}.{ident(name)}"
    reset_table(ch, guard, checkpoints, replica, topic, ends, sweep)
    console.print(f"{replica} dropped; {topic} resumes at {ends}", highlight=False)
    if not snapshot:
        return
    dsn = client_environment().get("ADMIN_DSN") or ""
    if not dsn:
        fail("no ADMIN_DSN: ask Debezium for an incremental snapshot of the table yourself "
             "(a row in its signal table, docs/troubleshooting.md)")  # fmt: skip
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        signal = request_incremental_snapshot(conn, [f"{schema}.{name}"])
    console.print(f"incremental snapshot of {table} requested (signal {signal})", highlight=False)


# ---- read models -----------------------------------------------------------------------------

read_models_app = typer.Typer(
    help="The materialized read models: their versions and a check against their definitions.",
    no_args_is_help=True,
)
app.add_typer(read_models_app, name="read-models")


def _maintainer(config_file: Path | None) -> Any:
    from projector.config import open_backend
    from projector.read_models.maintenance import maintainer_for

    config = _config(config_file)
    try:
        maintainer = maintainer_for(config, open_backend(config))
    except ProjectorError as exc:
        fail(str(exc))
    if maintainer is None:
        fail("this configuration does not keep read models (maintain_read_models = false)")
        raise typer.Exit(1)
    maintainer.ensure_known()
    return maintainer


@read_models_app.command("list")
def read_models_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Each read-model family: the version serving, the version building (with its backfill
    progress), or the error that stopped it."""
    rows = _maintainer(config_file).versions()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("family", "version", "state", "backfill", "models", "error")
    for row in rows:
        table.add_row(row["family"], row["version"], row["state"], row["backfill"],
                      ", ".join(row["models"]), row["error"][:80])  # fmt: skip
    console.print(table)


@read_models_app.command("reconcile")
def read_models_reconcile(
    limit: int = typer.Option(10, min=1, help="Differing rows shown per read model."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Compare every serving read model with its definition evaluated over the replicas now
    (run it while the projector is stopped, or they may differ by the batch in flight). Exits 1
    with the differing rows when any read model drifted."""
    found = _maintainer(config_file).reconcile(limit)
    drifted = {name: rows for name, rows in found.items() if rows}
    for name in sorted(found):
        mark = "DRIFT" if name in drifted else "equal"
        console.print(f"{mark:5}  {name}", highlight=False)
        for row in drifted.get(name, []):
            console.print(f"       {json.dumps(row, default=str)}", highlight=False)
    if not found:
        fail("no read model is serving yet")
    if drifted:
        raise typer.Exit(1)


# ---- verify ----------------------------------------------------------------------------------


@app.command("verify")
def verify(
    name: str | None = typer.Argument(
        None, metavar="[NAME]", help="A replica table as SCHEMA.TABLE, or a read model's name."
    ),
    every: bool = typer.Option(False, "--all", help="Every replica table and read model."),
    sample: int | None = typer.Option(
        None,
        "--sample",
        min=1,
        metavar="N",
        help="Compare N random key ranges of each table instead of all (for big tables).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Reconcile ClickHouse with Postgres: per replica table, row counts, then hashes per key
    range, down to the keys that differ (which side, which columns); per read model, its rows
    against its definition over the replicas. Exit 0 when all are equal, 1 with the drift, 2
    when it cannot compare (an unknown NAME, a side unreachable).

    Postgres is read in one snapshot, and ClickHouse waited for until the projector has applied
    it; keys that still differ are checked again, so changes written meanwhile are not drift.
    On the embedded chDB backend run it while no projector runs (one process owns chDB), after
    `projector run --until-caught-up`; on a ClickHouse server it runs beside the projector."""
    from projector.errors import VerifyError
    from projector.operations.verify import (
        TableVerifier,
        Verdict,
        source_snapshot,
        verify_read_models,
    )

    if (name is None) == (not every):
        fail("give one NAME (SCHEMA.TABLE or a read model) or --all", code=2)
    config = _config(config_file)
    ch = _verify_backend(config)
    projector_may_run = config.backend == "server"
    verdicts: list[Verdict] = []
    skipped: dict[str, str] = {}
    try:
        with (
            source_snapshot(config, client_environment().get("ADMIN_DSN")) as snapshot,
            _verify_progress() as progress,
        ):
            verifier = TableVerifier(config, ch, snapshot, projector_may_run, progress)
            tables = verifier.replica_tables()
            maintainer = _verify_maintainer(config, ch)
            models = _serving_read_models(maintainer)
            if name is not None and name not in tables and name not in models:
                fail(f"{name!r} is neither a replica table nor a serving read model; replica "
                     f"tables: {', '.join(tables) or 'none'}; read models: "
                     f"{', '.join(models) or 'none'}", code=2)  # fmt: skip
            plans = []
            for table in tables if name is None else [t for t in tables if t == name]:
                plan = verifier.plan(table)
                if isinstance(plan, str):
                    skipped[table] = plan
                else:
                    plans.append(plan)
            progress("comparing", total=len(plans) + bool(models))
            if plans:
                verdicts += verifier.verify(plans, sample)
            if models and (name is None or name in models):
                progress("read models: comparing with their definitions")
                wanted = None if name is None else {name}
                verdicts += verify_read_models(maintainer, wanted, projector_may_run)
                progress("done", completed=len(plans) + 1)
    except VerifyError as exc:
        fail(str(exc), code=2)
    if not verdicts and not skipped:
        fail("nothing to verify: no replica table or read model in ClickHouse (is this the "
             "projector's configuration? `projector status` shows what it applied)", code=2)  # fmt: skip
    _print_verdicts(verdicts, skipped, as_json)
    if not all(v.equal for v in verdicts):
        raise typer.Exit(1)


def _verify_backend(config: ProjectorConfig) -> Any:
    from projector.config import open_backend

    try:
        ch = open_backend(config)
        ch.rows("SELECT 1")
    except RuntimeError as exc:  # chDB's only error type; a held directory says no more
        fail(f"cannot open the embedded ClickHouse at {config.chdb_path} ({exc}); most likely "
             "a projector owns it: on chDB, verify runs while no projector runs (stop it, or "
             "verify beside it on a ClickHouse server, PROJECTOR_BACKEND=server)", code=2)  # fmt: skip
    except ProjectorError as exc:
        fail(f"cannot reach ClickHouse: {exc}", code=2)
    return ch


def _verify_maintainer(config: ProjectorConfig, ch: ParameterisedClickHouse) -> Any:
    from projector.read_models.maintenance import maintainer_for

    maintainer = maintainer_for(config, ch)
    if maintainer is not None:
        maintainer.ensure_known()
    return maintainer


def _serving_read_models(maintainer: Any) -> list[str]:
    if maintainer is None:
        return []
    return sorted(model.name for versions in maintainer.active.values() for version in versions
                  if version.state == "serving" for model in version.family.models)  # fmt: skip


@contextmanager
def _verify_progress() -> Iterator[Callable[..., None]]:
    """A bar of the tables (and read models) compared, with the step verify is at, when stdout
    is a terminal; else nothing. Call it as `progress(step, total=n, completed=n)`."""
    if not Console().is_terminal:
        yield lambda *_, **__: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console,
                  transient=True) as bar:  # fmt: skip
        task = bar.add_task("verifying", total=None)

        def progress(step: str, total: int | None = None, completed: int | None = None) -> None:
            bar.update(task, description=step, total=total, completed=completed)

        yield progress


def _print_verdicts(verdicts: list[Any], skipped: dict[str, str], as_json: bool) -> None:
    if as_json:
        report = {"equal": all(v.equal for v in verdicts),
                  "results": [v.as_json() for v in verdicts], "skipped": skipped}  # fmt: skip
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    out = Console(soft_wrap=True, highlight=False)
    for v in verdicts:
        mark = "equal" if v.equal else "DRIFT"
        if v.kind == "table":
            counts = (
                f"{v.postgres_rows:,} rows"
                if v.postgres_rows == v.clickhouse_rows
                else f"{v.postgres_rows:,} rows in Postgres, {v.clickhouse_rows:,} in ClickHouse"
            )
            out.print(f"{mark}  table {v.name}: {counts}, {v.ranges} key ranges", markup=False)
        else:
            out.print(f"{mark}  read model {v.name}", markup=False)
        for drift in v.drift:
            key = ", ".join(f"{k}={val}" for k, val in drift.key.items())
            what = f": {', '.join(drift.columns)}" if drift.columns else ""
            out.print(f"       {key}  {drift.side}{what}", markup=False)
        for row in v.rows:
            out.print(f"       {json.dumps(row, default=str)}", markup=False)
        if v.ranges_not_listed:
            out.print(f"       ... and {v.ranges_not_listed:,} more differing key ranges (keys "
                      "not listed: repair the table, then verify again)", markup=False)  # fmt: skip
        if v.not_compared:
            out.print(f"       not compared: {', '.join(v.not_compared)}", markup=False)
    for table, reason in skipped.items():
        out.print(f"skip   table {table}: {reason}", markup=False)


# ---- rebuild (projector/operations/requests.py) -----------------------------------------------------------

FOLLOW_POLL_S = 0.5


@app.command("rebuild")
def rebuild(
    name: str = typer.Argument(..., help="A read model or its family (`projector read-models list`), or a replica table as SCHEMA.TABLE."),
    source: str | None = typer.Option(None, "--from", help="Where to rebuild from: replicas (a read model, the default); kafka or snapshot (a replica table, SCHEMA.TABLE; by default kafka when Kafka holds the table's whole history, else snapshot)."),
    no_swap: bool = typer.Option(False, "--no-swap", help="Build and verify it, but leave the serving version serving."),
    swap: bool = typer.Option(False, "--swap", help="Serve the version a --no-swap rebuild built."),
    rollback: bool = typer.Option(False, "--rollback", help="Serve the version the last rebuild replaced again."),
    drop_old: bool = typer.Option(False, "--drop-old", help="Drop the replaced version (no rollback after this)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; change nothing."),
    follow: bool = typer.Option(True, help="Follow the rebuild to its end (Ctrl-C stops following, not the rebuild)."),
    config_file: Path | None = ConfigOption,
) -> None:  # fmt: skip
    """Rebuild a read model's family from the replicas while the projection keeps serving: a
    new version is built beside the serving one, kept by every batch, verified against its
    definition, then swapped in (each view in one statement); the replaced version is kept for
    `--rollback` until `--drop-old`. With a ClickHouse server the running projector does the
    work between batches (this command asks and follows); with chDB (no projector may run) this
    command does it itself."""
    from projector.operations.read_model_rebuild import run_here
    from projector.operations.requests import (
        DROP_OLD,
        REBUILD,
        ROLLBACK,
        SWAP,
        OpsRequests,
    )

    actions = [a for a, on in ((SWAP, swap), (ROLLBACK, rollback), (DROP_OLD, drop_old)) if on]
    if len(actions) > 1 or (actions and no_swap):
        fail("give at most one of --swap, --rollback, --drop-old (and --no-swap only to rebuild)",
             code=2)  # fmt: skip
    action = actions[0] if actions else REBUILD
    config = _config(config_file)
    if "." in name:  # SCHEMA.TABLE: a replica table
        _rebuild_replica(name, source or "auto", action, no_swap, dry_run, follow, config)
        return
    if (source or "replicas") != "replicas":
        fail(f"--from {source}: only read models can be rebuilt so far (from the replicas); to "
             "rebuild a replica table, `projector table reset SCHEMA.TABLE` re-snapshots it "
             "through Debezium", code=2)  # fmt: skip
    maintainer = _maintainer(config_file)
    try:
        family = maintainer.family_named(name)
    except ProjectorError as exc:
        fail(str(exc), code=2)
        raise
    versions = [v for v in maintainer.versions() if v["family"] == family.name]
    if dry_run:
        for line in _rebuild_plan(action, family.name, family.version, versions, no_swap):
            console.print(line, highlight=False)
        return
    requests = OpsRequests(maintainer.ch, config.control_database)
    requests.create()
    request = requests.ask(action, name, "no-swap" if no_swap else "")
    if config.backend == "chdb":
        # One process owns the data directory: no projector runs beside us; do its part here.
        started = time.monotonic()
        if action != REBUILD:  # done at once: no progress to show
            run_here(requests, maintainer)
            _rebuild_report(requests, maintainer, request.id, family.name, 0)
            return
        with _rebuild_progress() as progress:
            task = progress.add_task(family.name, total=None, rate="")

            def step(version: str) -> None:
                for row in maintainer.versions():
                    if row["version"] == version:
                        _show_progress(progress, task, row, config.read_model_backfill_chunk_keys,
                                       started)  # fmt: skip

            run_here(requests, maintainer, step)
        _rebuild_report(requests, maintainer, request.id, family.name, time.monotonic() - started)
        return
    console.print(f"asked the running projector ({action} {name}, request {request.id})",
                  highlight=False)  # fmt: skip
    if not follow:
        return
    try:
        started = time.monotonic()
        _follow_request(requests, maintainer, request.id, family.name,
                        config.read_model_backfill_chunk_keys)  # fmt: skip
    except KeyboardInterrupt:
        console.print(f"stopped following; the projector goes on (`projector rebuild {name} "
                      "--dry-run` or `projector read-models list` shows where it stands)")  # fmt: skip
        raise typer.Exit(130) from None
    _rebuild_report(requests, maintainer, request.id, family.name, time.monotonic() - started)


def _rebuild_replica(
    table: str, source: str, action: str, no_swap: bool, dry_run: bool, follow: bool,
    config: ProjectorConfig,
) -> None:  # fmt: skip
    """`projector rebuild SCHEMA.TABLE [--from kafka|snapshot]` (projector/operations/replica_rebuild.py)."""
    from projector.commit.checkpoint import PROJECTION, CheckpointStore
    from projector.config import open_backend
    from projector.operations.replica_rebuild import (
        BUILDING,
        SNAPSHOT,
        SNAPSHOTTING,
        run_replica_jobs_here,
    )
    from projector.operations.requests import REBUILD, OpsRequests

    if action == REBUILD and source not in ("kafka", "snapshot", "auto"):
        fail(f"a replica table is rebuilt --from kafka or --from snapshot (not --from {source})",
             code=2)  # fmt: skip
    if no_swap:
        fail("--no-swap is for read models; a replica table is verified, then swapped", code=2)
    ch = open_backend(config)
    requests = OpsRequests(ch, config.control_database)
    requests.create()
    rebuilds = _replica_rebuilds(config, ch)
    rebuilds.create()
    live = CheckpointStore(ch, config.control_database, PROJECTION)
    live.create()

    def live_next(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        found = live.load(keys)
        return {k: (found[k].resume_offset if k in found else None) for k in keys}

    topic = f"{config.topic_prefix}.{table}"
    if dry_run:
        jobs = [j for j in rebuilds.jobs() if j.table == table]
        console.print(f"{table}: " + (", ".join(f"job {j.id} {j.state}" for j in jobs)
                                      or "no rebuild kept"), highlight=False)  # fmt: skip
        if action == REBUILD:
            lows = {p: rebuilds.earliest(topic).get(p) for p in rebuilds.partitions(topic)}
            complete = all(low == 0 for low in lows.values())
            if source == "snapshot" or (source == "auto" and not complete):
                console.print("would rebuild it from a Debezium incremental snapshot"
                              + ("" if complete else f" ({topic} no longer holds its whole "
                                 f"history: earliest offsets {lows})")
                              + " into a shadow table that follows the live one from its "
                              "position, wait until Debezium has read the table whole, verify "
                              "it against Postgres and exchange them, keeping the previous "
                              "table for --rollback", highlight=False)  # fmt: skip
            else:
                console.print(f"would rebuild it from {topic} (earliest offsets {lows}) into a "
                              "shadow table beside it, catch it up with the live table, verify "
                              "and exchange them, keeping the previous table for --rollback",
                              highlight=False)  # fmt: skip
        else:
            console.print(f"would {action} (done by the projector between batches)")
        return
    request = requests.ask(action, table, f"from-{source}")
    started = time.monotonic()
    if config.backend == "chdb":  # no projector runs beside us: its part here, the table still
        try:
            if action != REBUILD:  # done at once, no progress to show
                run_replica_jobs_here(requests, rebuilds, live_next)
            else:
                with _rebuild_progress() as progress:
                    task = progress.add_task(table, total=None, rate="")
                    shown = 0.0

                    def show(job: Any) -> None:  # twice a second: each look costs two queries
                        nonlocal shown
                        if time.monotonic() - shown >= 0.5:
                            shown = time.monotonic()
                            _show_replica_progress(
                                progress, task, rebuilds, job, live_next, started
                            )

                    run_replica_jobs_here(requests, rebuilds, live_next, show)
        finally:
            rebuilds.close()  # its reading threads end before the interpreter does
    else:
        console.print(f"asked the running projector ({action} {table}, request {request.id})",
                      highlight=False)  # fmt: skip
        if not follow:
            return
        try:
            with _rebuild_progress() as progress:
                task = progress.add_task(table, total=None, rate="")
                while True:
                    asked = requests.get(request.id)
                    job = (
                        None
                        if asked is None or asked.state != "taken"
                        else rebuilds.job(asked.detail)
                    )
                    if asked is not None and asked.state not in ("requested", "taken"):
                        break
                    if job is not None:
                        if job.state not in BUILDING:
                            break
                        _show_replica_progress(progress, task, rebuilds, job, live_next, started)
                    time.sleep(FOLLOW_POLL_S)
        except KeyboardInterrupt:
            console.print("stopped following; the projector goes on")
            raise typer.Exit(130) from None
    asked = _taken_request(requests, request.id, "the request was not taken")
    if asked is None:
        return
    job = rebuilds.job(asked.detail)
    assert job is not None
    if job.state == SNAPSHOTTING and config.backend == "chdb":
        console.print(f"{table} job {job.id}: Debezium was asked for a snapshot of the table; "
                      "with chDB the command cannot apply it (the live table must move for the "
                      "snapshot's reads to arrive, and one process owns the data): the next "
                      "`projector run` builds, verifies and swaps it", highlight=False)  # fmt: skip
        return
    origin = "a Debezium snapshot" if job.source == SNAPSHOT else "Kafka"
    console.print(f"{table} job {job.id} (from {origin}): {job.state} in "
                  f"{time.monotonic() - started:.1f} s; {job.detail}", highlight=False)  # fmt: skip
    if job.state == "failed":
        raise typer.Exit(1)
    console.print(f"`projector rebuild {table} --rollback` serves the previous table again, "
                  f"`projector rebuild {table} --drop-old` drops it", highlight=False)  # fmt: skip


def _replica_rebuilds(config: ProjectorConfig, ch: Any) -> Any:
    from projector.operations.replica_rebuild import ReplicaRebuilds
    from schemas.registry import SchemaCache
    from schemas.upcasters import Upcasters

    def partitions(topic: str) -> int | None:
        return len(rebuilds.partitions(topic)) or None  # as Kafka describes it now

    rebuilds = ReplicaRebuilds.for_config(
        config,
        ch,
        SchemaCache(config.registry_url),
        Upcasters.load(config.upcasters_file),
        partitions,
    )
    return rebuilds


def _show_replica_progress(
    progress: Any, task: Any, rebuilds: Any, job: Any, live_next: Any, started: float
) -> None:
    keys = [(job.topic, p) for p in rebuilds.partitions(job.topic)]
    done = rebuilds.checkpoints(job).load(keys)
    # A snapshot rebuild counts from where its shadow started (S1).
    first = sum(int(o) for o in job.snapshot.get("start", {}).values())
    applied = sum(c.resume_offset for c in done.values()) - first
    total = sum(v or 0 for v in live_next(keys).values()) - first
    rate = applied / max(1e-3, time.monotonic() - started)
    phase = {"snapshotting": "snapshotting, ", "catching-up": "catching up, "}.get(job.state, "")
    progress.update(
        task, completed=applied, total=max(total, applied),
        rate=f"events ({phase}{rate:,.0f} events/s)",
    )  # fmt: skip


def _rebuild_plan(
    action: str, family: str, definition: str, versions: list[dict[str, Any]], no_swap: bool
) -> list[str]:
    states = ", ".join(f"{v['version']} {v['state']}" for v in versions) or "no version yet"
    lines = [f"{family}: {states}"]
    if action == "rebuild":
        lines.append(f"would build version {definition}r<request> from the replicas beside the "
                     "serving one, kept by every batch, verify it against its definition, and "
                     + ("leave it built (--no-swap)" if no_swap else
                        "swap it in, keeping the serving version for --rollback"))  # fmt: skip
    else:
        lines.append(f"would {action} (done by the projector between batches)")
    return lines


def _rebuild_progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}, ETA"), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip


def _show_progress(
    progress: Any, task: Any, version: dict[str, Any], chunk_keys: int, started: float
) -> None:
    done, total = version["done_steps"], version["steps"]  # chunks built, then verified
    rate = done * chunk_keys / max(1e-3, time.monotonic() - started)
    progress.update(task, completed=done, total=total, rate=f"steps, {rate:,.0f} keys/s")


def _follow_request(
    requests: Any, maintainer: Any, request_id: str, family: str, chunk_keys: int
) -> None:
    """Follow a request until the projector has settled it (and, for a rebuild, its version
    is built): a progress bar over the backfill's chunks."""
    with _rebuild_progress() as progress:
        task = progress.add_task(family, total=None, rate="")
        waited = time.monotonic()
        while True:
            request = requests.get(request_id)
            if request is None or request.state == "requested":
                if time.monotonic() - waited > 30:
                    progress.update(
                        task, description=f"{family} (waiting: is `projector run` running?)"
                    )
                time.sleep(FOLLOW_POLL_S)
                continue
            if request.state != "taken":
                return
            version = next(
                (v for v in maintainer.versions() if v["version"] == request.detail), None
            )
            if version is None or version["state"] != "building":
                return
            _show_progress(progress, task, version, chunk_keys, waited)
            time.sleep(FOLLOW_POLL_S)


def _taken_request(requests: Any, request_id: str, not_taken: str) -> Any:
    """The request when the projector took it (a job goes on); otherwise says what became of
    it — not taken, refused (exit 1), or done with its line — and returns None."""
    request = requests.get(request_id)
    if request is None or request.state == "requested":
        fail(not_taken)
    if request.state == "failed":
        fail(f"refused: {request.detail}")
    if request.state == "done":
        console.print(request.detail, highlight=False)
        return None
    return request


def _rebuild_report(
    requests: Any, maintainer: Any, request_id: str, family: str, seconds: float
) -> None:
    """What became of a request: refused, done, or the rebuilt version's state and size."""
    request = _taken_request(
        requests, request_id, "the request was not taken (does this projector keep read models?)"
    )
    if request is None:
        return
    found = [v for v in maintainer.versions() if v["version"] == request.detail]
    if not found:
        fail(f"version {request.detail} was retired meanwhile (a newer version replaced it)")
    version = found[0]
    entity = maintainer.family_named(family).entity.name
    (rows,) = maintainer.ch.rows(
        f"SELECT count() AS n FROM {ident(maintainer.database)}.{ident(f'{entity}__{request.detail}')} FINAL"
    )
    console.print(f"{family} version {request.detail}: {version['state']}; {int(rows['n']):,} "
                  f"entity rows, {version['chunks']} chunk(s), {seconds:.1f} s", highlight=False)  # fmt: skip
    if version["state"] == "failed":
        fail(str(version["error"]))
    if version["state"] == "serving":
        console.print(f"the replaced version is kept: `projector rebuild {family} --rollback` "
                      f"serves it again, `projector rebuild {family} --drop-old` drops it",
                      highlight=False)  # fmt: skip
    elif version["state"] == "built":
        console.print(f"verified, not serving: `projector rebuild {family} --swap` serves it",
                      highlight=False)  # fmt: skip


# ---- pause | resume ----------------------------------------------------------------------------


@app.command("pause")
def pause(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Stop applying a table's changes (its replica and the read models it feeds hold where they
    are, their watermarks too) until `projector resume`. The running projector pauses it after
    the batch in flight; a projector started later starts with it paused."""
    _set_pause(table, True, yes, config_file)


@app.command("resume")
def resume(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Apply a paused table's changes again, from where it stopped."""
    _set_pause(table, False, yes, config_file)


def _set_pause(table: str, paused: bool, yes: bool, config_file: Path | None) -> None:
    from projector.config import open_backend
    from projector.operations.pauses import TablePauses

    config = _config(config_file)
    if "." not in table:
        fail(f"{table!r}: give the source table as SCHEMA.TABLE", code=2)
    verb = "pause" if paused else "resume"
    if not yes and not typer.confirm(f"{verb} {table}?"):
        raise typer.Exit(1)
    pauses = TablePauses(open_backend(config), config.control_database)
    pauses.create()
    pauses.want(table, paused)
    console.print(f"{table}: {verb} recorded; the projector {'pauses' if paused else 'resumes'} "
                  "it after the batch in flight (`projector status` shows it)", highlight=False)  # fmt: skip


# ---- reset (projector/operations/offset_reset.py) -------------------------------------------------------


@app.command("reset")
def reset(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    to_offset: int | None = typer.Option(None, "--to-offset", help="Re-read from this Kafka offset."),
    to_time: str | None = typer.Option(None, "--to-time", help="Re-read from the first event at or after this ISO-8601 time (UTC without a zone)."),
    partition: list[int] | None = typer.Option(None, "--partition", help="Only this partition (repeatable; default: all)."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation (scripts)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    config_file: Path | None = ConfigOption,
) -> None:  # fmt: skip
    """Make a replica table re-read its topic from an offset (or a time), exactly once, while the
    running projector keeps serving it and applying every other table. Moving back is safe: the
    replica and the read models it feeds stay exact throughout (newer rows win over re-read ones).
    Moving forward SKIPS events and leaves the table wrong until they are re-read (`projector
    verify` shows it). With a ClickHouse server the running projector pauses the table, moves,
    and resumes it; with chDB stop the projector first. (`projector table reset` is another
    thing: it drops a stopped table and re-snapshots it.)"""
    from projector.errors import ResetRefused
    from projector.operations.offset_reset import move, parse_time, plan, resolve_target

    config = _config(config_file)
    schema, _, name = table.partition(".")
    if not schema or not name:
        fail(f"{table!r}: give the source table as SCHEMA.TABLE", code=2)
    if (to_offset is None) == (to_time is None):
        fail("give one of --to-offset N or --to-time ISO-8601", code=2)
    try:
        when_ms = None if to_time is None else int(parse_time(to_time).timestamp() * 1000)
        topic = f"{config.topic_prefix}.{table}"
        retained, found, earliest = _kafka_positions(config, topic, table, partition, when_ms)
        ch, checkpoints, pauses = _reset_backend(config)
        keys = [(topic, p) for p in retained]
        current = {p: c.resume_offset for (_, p), c in checkpoints.load(keys).items()}
        targets = {
            p: resolve_target(
                topic, p, low, high, to_offset, when_ms, found.get(p), earliest.get(p)
            )
            for p, (low, high) in retained.items()
        }
        the_plan = plan(table, topic, retained, current, targets)
        _refuse_unsafe_reset(config, ch, the_plan)
    except ResetRefused as exc:
        fail(str(exc), code=2)
        raise
    for line in the_plan.lines():
        console.print(line, highlight=False, markup=False)
    if dry_run:
        return
    if not any(m.replayed or m.skipped for m in the_plan.moves):
        console.print("nothing to move")
        return
    running = pauses is not None
    if not running:
        console.print("no projector is running (chDB, or none in the group): the next "
                      "`projector run` starts there")  # fmt: skip
    question = f"move {table} FORWARD, skipping events?" if the_plan.forward else f"reset {table}?"
    if not yes and not typer.confirm(question):
        raise typer.Exit(1)
    try:
        done = move(the_plan, checkpoints, pauses,
                    say=lambda line: console.print(line, highlight=False))  # fmt: skip
    except ResetRefused as exc:
        fail(str(exc))
        raise
    for m in done.moves:
        console.print(f"partition {m.partition}: moved from offset {m.current:,} to {m.target:,}",
                      highlight=False)  # fmt: skip
    replayed, skipped = sum(m.replayed for m in done.moves), sum(m.skipped for m in done.moves)
    who = "the projector" if running else "the next `projector run`"
    if replayed:
        console.print(f"{who} re-reads {replayed:,} event(s) (`projector status` shows the lag; "
                      "metric projector_events_reread_total)", highlight=False)  # fmt: skip
    if skipped:
        console.print(f"{skipped:,} event(s) skipped: `projector verify {table}` shows what "
                      "the table misses", highlight=False)  # fmt: skip


def _kafka_positions(
    config: ProjectorConfig, topic: str, table: str, only: list[int] | None, when_ms: int | None
) -> tuple[dict[int, tuple[int, int]], dict[int, int], dict[int, int]]:
    """Per partition of `topic` (or of `only`): Kafka's retained offsets (low, end); for a time,
    the first offset at or after it (-1: none) and the earliest retained message's timestamp."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from projector.errors import ResetRefused

    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap,
                         "group.id": f"{config.group_id}-reset", "enable.auto.commit": False})  # fmt: skip
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise ResetRefused(f"unknown table {table}: Kafka has no topic {topic} (name the "
                               "source table as SCHEMA.TABLE; `projector status` lists them)")  # fmt: skip
        partitions = sorted(metadata.partitions)
        if only:
            unknown = sorted(set(only) - set(partitions))
            if unknown:
                raise ResetRefused(f"{topic} has no partition {', '.join(map(str, unknown))} "
                                   f"(its partitions: {', '.join(map(str, partitions))})")  # fmt: skip
            partitions = sorted(set(only))
        retained = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in partitions
        }
        found: dict[int, int] = {}
        earliest: dict[int, int] = {}
        if when_ms is not None:
            asked = [TopicPartition(topic, p, when_ms) for p in partitions]
            found = {
                tp.partition: tp.offset for tp in consumer.offsets_for_times(asked, timeout=10)
            }
            for p, (low, high) in retained.items():
                if low > 0 and found[p] == low and high > low:  # did retention delete newer ones?
                    consumer.assign([TopicPartition(topic, p, low)])
                    message = consumer.consume(1, timeout=10)
                    if message and message[0].error() is None:
                        earliest[p] = message[0].timestamp()[1]
                    consumer.unassign()
    except KafkaException as exc:
        raise ResetRefused(f"cannot read {topic}'s offsets from Kafka: {exc}") from exc
    finally:
        consumer.close()
    return {p: (int(lo), int(hi)) for p, (lo, hi) in retained.items()}, found, earliest


def _reset_backend(config: ProjectorConfig) -> tuple[Any, Any, Any]:
    """ClickHouse, the checkpoint store, and the pause tables when a projector runs beside this
    command (None: chDB, whose data only one process opens, or no member in the group)."""
    from confluent_kafka.admin import AdminClient

    from projector.commit.checkpoint import PROJECTION, CheckpointStore
    from projector.config import open_backend
    from projector.operations.pauses import TablePauses

    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    checkpoints.create()
    if config.backend == "chdb":
        return ch, checkpoints, None
    admin = AdminClient({"bootstrap.servers": config.kafka_bootstrap})
    futures = admin.describe_consumer_groups([config.group_id], request_timeout=10)
    members = futures[config.group_id].result(timeout=15).members
    if not members:
        return ch, checkpoints, None
    pauses = TablePauses(ch, config.control_database)
    pauses.create()
    return ch, checkpoints, pauses


def _refuse_unsafe_reset(config: ProjectorConfig, ch: Any, the_plan: Any) -> None:
    """A table whose replica cannot be moved as asked: none yet, append-only moved back, or a
    rebuild chasing it (its shadow follows the live position, which must only grow)."""
    from projector.clickhouse import quote
    from projector.errors import ResetRefused

    schema, name = the_plan.table.split(".", 1)
    database = config.replica_prefix + schema
    engines = ch.rows(f"SELECT engine FROM system.tables WHERE database = {quote(database)} "
                      f"AND name = {quote(name)}")  # fmt: skip
    if not engines:
        raise ResetRefused(f"unknown table {the_plan.table}: ClickHouse has no replica "
                           f"{database}.{name} (the projector has applied nothing of it yet)")  # fmt: skip
    if "Replacing" not in engines[0]["engine"] and any(m.replayed for m in the_plan.moves):
        raise ResetRefused(f"{the_plan.table} has no primary key: its replica keeps every event, "
                           "and re-reading would add them again; `projector rebuild "
                           f"{the_plan.table} --from kafka` rebuilds it")  # fmt: skip
    rebuilds = _replica_rebuilds(config, ch)
    rebuilds.create()
    chasing = [j for j in rebuilds.jobs() if j.table == the_plan.table]
    if chasing:
        job = chasing[-1]
        raise ResetRefused(f"a rebuild of {the_plan.table} (job {job.id}, {job.state}) keeps a "
                           "table following the live one: let it finish and `projector rebuild "
                           f"{the_plan.table} --drop-old` first")  # fmt: skip


# ---- connectors ------------------------------------------------------------------------------

connectors_app = typer.Typer(
    help="Manage the Debezium connector through the Kafka Connect REST API.", no_args_is_help=True
)
app.add_typer(connectors_app, name="connectors")


def connector_environment() -> dict[str, str]:
    """The addresses the connector needs, by the one rule of `client_environment`."""
    return client_environment()


def _connect_and_name() -> tuple[ConnectClient, str]:
    from connectors import ConnectClient, render_connector

    env = connector_environment()
    if "CONNECT_URL" not in env:
        fail("CONNECT_URL is not set and no local stack exists (projector stack up)")
    return ConnectClient(env["CONNECT_URL"]), render_connector(env)["name"]


def _connector_call(action: str) -> None:
    from connectors import ConnectorError

    try:
        client, name = _connect_and_name()
        getattr(client, action)(name)
    except ConnectorError as exc:
        fail(str(exc))
        return
    console.print(f"{action}: {name}", highlight=False)


@connectors_app.command("apply")
def connectors_apply(
    capture: str = typer.Option(
        None,
        "--capture",
        help="Schemas and/or schema.table names to capture, comma-separated (env CAPTURE; "
        "default: public).",
    ),
    set_identity_full: bool = typer.Option(
        False,
        "--set-replica-identity-full",
        help="Capture tables without a primary key too, after setting REPLICA IDENTITY FULL on "
        "them (their UPDATEs and DELETEs then log the whole old row). Without it they are left "
        "out with a warning. Env SET_REPLICA_IDENTITY_FULL=true does the same.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Show what would change in the publication and the connector config, and change "
        "nothing.",
    ),
) -> None:
    """Create or update the connector, sync the publication, snapshot newly captured tables.

    A table Postgres could not publish UPDATEs and DELETEs of (no primary key, no replica
    identity) is left out, with a warning: in the publication, the application's UPDATEs and
    DELETEs on it would fail."""
    from connectors import ConnectClient, ConnectorError, apply_connector, display_name
    from connectors import dry_run as plan_dry_run

    env = connector_environment()
    if capture:
        env["CAPTURE"] = capture
    for needed in ("CONNECT_URL", "ADMIN_DSN"):
        if needed not in env:
            fail(f"{needed} is not set and no local stack exists (projector stack up)")
    client = ConnectClient(env["CONNECT_URL"])
    try:
        if dry_run:
            plan = plan_dry_run(client, env["ADMIN_DSN"], env, set_identity_full)
            _warn_left_out(plan.left_out)
            _warn_not_snapshotted(plan.not_snapshotted)
            _print_plan(plan)
            return
        result = apply_connector(client, env["ADMIN_DSN"], env, set_identity_full)
    except ConnectorError as exc:
        fail(str(exc))
        return
    _warn_left_out(result.left_out)
    for gap in result.identity_full:
        console.print(
            f"REPLICA IDENTITY FULL set on {', '.join(map(display_name, gap.relations))} "
            f"({gap.reason}): its UPDATEs and DELETEs now log the whole old row",
            highlight=False,
        )
    console.print(
        f"connector {result.connector}: {'updated' if result.config_changed else 'unchanged'}; "
        f"capturing {len(result.tables)} table(s)",
        highlight=False,
    )
    if result.publication.added:
        console.print(f"publication: added {', '.join(result.publication.added)}", highlight=False)
    if result.publication.removed:
        console.print(
            f"publication: removed {', '.join(result.publication.removed)}", highlight=False
        )
    if result.snapshot_signal:
        console.print(
            f"incremental snapshot requested (signal {result.snapshot_signal})", highlight=False
        )
    _warn_not_snapshotted(result.not_snapshotted)
    if not result.follows_new_tables:
        console.print(
            "[yellow]warning:[/yellow] the admin role may not create event triggers (only a "
            "superuser may): a table created later in a captured schema is captured when "
            "`projector connectors apply` runs again",
            highlight=False,
            soft_wrap=True,
        )


def _warn_left_out(gaps: tuple[IdentityGap, ...]) -> None:
    from connectors import display_name

    for gap in gaps:
        console.print(
            f"[yellow]warning:[/yellow] {display_name(gap.table)} is not captured: {gap.reason}. "
            "In the publication, every UPDATE and DELETE on it would fail. To capture it: "
            f"{gap.remedy()} (then apply again), or apply --set-replica-identity-full",
            highlight=False,
            soft_wrap=True,
        )


def _warn_not_snapshotted(tables: tuple[str, ...]) -> None:
    if tables:
        console.print(
            f"[yellow]warning:[/yellow] existing rows of {', '.join(tables)} are not copied: "
            "Debezium's incremental snapshot needs a primary key. Their changes from now on "
            "are captured.",
            highlight=False,
            soft_wrap=True,
        )


def _print_plan(plan: ApplyPlan) -> None:
    """What `connectors apply` would do, as a diff (secrets masked; lines never wrapped)."""
    from connectors import display_name

    out = Console(soft_wrap=True)
    change = plan.config_change
    if change.created:
        out.print(f"connector {plan.connector}: would be created", highlight=False)
    elif change:
        out.print(f"connector {plan.connector}: config would change", highlight=False)
    else:
        out.print(f"connector {plan.connector}: config unchanged", highlight=False)
    if not change.created:
        for key, value in change.added.items():
            out.print(f"  + {key} = {value}", highlight=False, markup=False)
        for key, value in change.removed.items():
            out.print(f"  - {key} = {value}", highlight=False, markup=False)
        for key, (now, after) in change.changed.items():
            out.print(f"  ~ {key}: {now} -> {after}", highlight=False, markup=False)
    publication = plan.config["publication.name"]
    added, removed = plan.publication.added, plan.publication.removed
    verb = (
        "would be created"
        if plan.publication.created
        else "changes"
        if added or removed
        else "unchanged"
    )
    out.print(f"publication {publication}: {verb}", highlight=False)
    for table in added:
        out.print(f"  + {table}", highlight=False, markup=False)
    for table in removed:
        out.print(f"  - {table}", highlight=False, markup=False)
    for gap in plan.identity_full:
        out.print(
            f"would set REPLICA IDENTITY FULL on {', '.join(map(display_name, gap.relations))} "
            f"({gap.reason})",
            highlight=False,
        )
    if plan.snapshot:
        out.print(
            f"would request an incremental snapshot of {', '.join(plan.snapshot)}", highlight=False
        )
    out.print("dry run: nothing was changed", highlight=False)


@connectors_app.command("status")
def connectors_status(
    as_json: bool = typer.Option(False, "--json", help="Print Kafka Connect's status document."),
) -> None:
    """Show the connector's and its tasks' state. Exit 1 unless all are RUNNING."""
    from connectors import ConnectorError, failure_summary

    try:
        client, name = _connect_and_name()
        status = client.status(name)
    except ConnectorError as exc:
        fail(str(exc))
        return
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(f"{name}: {status['connector']['state']}\n")
        for task in status.get("tasks", []):
            sys.stdout.write(f"  task {task['id']}: {task['state']}\n")
            if task.get("trace"):
                summary = failure_summary(task["trace"]).replace("\n", "\n    ")
                sys.stdout.write(f"    {summary}\n")
    states = [status["connector"]["state"]] + [t["state"] for t in status.get("tasks", [])]
    if any(s != "RUNNING" for s in states):
        raise typer.Exit(1)


@connectors_app.command("pause")
def connectors_pause() -> None:
    """Pause the connector (the replication slot keeps WAL until it resumes)."""
    _connector_call("pause")


@connectors_app.command("resume")
def connectors_resume() -> None:
    """Resume a paused connector."""
    _connector_call("resume")


@connectors_app.command("restart")
def connectors_restart() -> None:
    """Restart the connector and all its tasks."""
    _connector_call("restart")


@connectors_app.command("delete")
def connectors_delete() -> None:
    """Delete the connector from Kafka Connect (the slot and publication stay in Postgres)."""
    _connector_call("delete")
