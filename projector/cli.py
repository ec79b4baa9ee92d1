"""The `projector` command line: one entry point, a sub-command per job, `--help` everywhere."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from connectors import ConnectClient, ConnectorError, apply_connector, render_connector
from projector.config import ProjectorConfig, load_config
from projector.errors import ConfigError, ProjectorError
from projector.stack import Stack, StackError, healthy

app = typer.Typer(
    help="CDC projection engine: Postgres → Debezium → Kafka → ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
)
stack_app = typer.Typer(
    help="Run the local real stack (Postgres, Kafka, Connect, registry).", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")

console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@stack_app.command("up")
def stack_up() -> None:
    """Fetch what is missing, start every component, wait until all are healthy (idempotent)."""
    stack = Stack()
    try:
        statuses = stack.up(log=lambda m: console.print(m, highlight=False))
    except StackError as exc:
        _fail(str(exc))
        return
    if not healthy(statuses):
        bad = ", ".join(f"{s.name}: {s.detail}" for s in statuses if s.state != "healthy")
        _fail(f"stack is not healthy: {bad}")
    console.print("[green]stack is up[/green]; `projector stack status --json` prints addresses")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every component (data stays in the state dir; `up` resumes it)."""
    Stack().down(log=lambda m: console.print(m, highlight=False))


@stack_app.command("status")
def stack_status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output with addresses."),
) -> None:
    """Show each component's state and the addresses a client needs. Exit 1 if any is unhealthy."""
    statuses = Stack().status()
    if as_json:
        sys.stdout.write(json.dumps({s.name: asdict(s) for s in statuses}, indent=2) + "\n")
    else:
        table = Table("component", "state", "pid", "detail", "endpoint")
        for s in statuses:
            colour = {"healthy": "green", "unhealthy": "yellow"}.get(s.state, "red")
            endpoint = (
                s.endpoint.get("url")
                or s.endpoint.get("bootstrap_servers")
                or s.endpoint.get("dsn", "")
            )
            table.add_row(
                s.name, f"[{colour}]{s.state}[/{colour}]", str(s.pid or ""), s.detail, endpoint
            )
        Console().print(table)
    if not healthy(statuses):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    name: str = typer.Argument(..., help="postgres | kafka | registry | connect"),
    lines: int = typer.Option(50, "--lines", "-n", help="How many lines from the end."),
) -> None:
    """Print the tail of one component's log."""
    stack = Stack()
    try:
        component = stack.component(name)
    except KeyError as exc:
        _fail(str(exc.args[0]), code=2)
        return
    sys.stdout.write(stack.tail(component, lines) + "\n")
    console.print(f"(log file: {stack.log_file(component)})", highlight=False)


@stack_app.command("fetch")
def stack_fetch() -> None:
    """Download the Java pieces (Kafka, Debezium, Apicurio, converter) into the cache."""
    from projector.stack.artifacts import fetch_all
    from projector.stack.settings import StackSettings

    try:
        paths = fetch_all(StackSettings(), log=lambda m: console.print(m, highlight=False))
    except StackError as exc:
        _fail(str(exc))
        return
    console.print(f"cached under {paths.kafka_classpath_dir.parent}", highlight=False)


@app.command("demo")
def demo(
    duration: float | None = typer.Option(
        None, help="Stop after this many seconds (default: run until Ctrl-C)."
    ),
    rate: float = typer.Option(20.0, help="Shop transactions per second."),
) -> None:
    """The main job, live: stack up, the shop application writing, the projector applying on
    embedded ClickHouse, and read models with the lag refreshing until Ctrl-C."""
    from projector.demo import run_demo

    try:
        code = run_demo(console, duration_s=duration, rate=rate)
    except (StackError, ConnectorError, ProjectorError) as exc:
        _fail(str(exc))
        return
    raise typer.Exit(code)


# ---- projector ---------------------------------------------------------------------------------

ConfigOption = typer.Option(None, "--config", help="TOML file with projector settings.")


def _config(path: Path | None) -> ProjectorConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail(str(exc), code=2)
        raise


@app.command("run")
def run(
    until_caught_up: bool = typer.Option(
        False,
        "--until-caught-up",
        help="Exit 0 once every assigned partition is applied to its end.",
    ),
    config_file: Path | None = ConfigOption,
) -> None:
    """Consume the change topics and apply them to ClickHouse (exactly-once effect)."""
    import logging

    from projector.clickhouse import open_backend
    from projector.runner import Projector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = _config(config_file)
    try:
        code = Projector(config, open_backend(config)).run(until_caught_up=until_caught_up)
    except ProjectorError as exc:
        _fail(str(exc))
        return
    raise typer.Exit(code)


@app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Where the projector stands: per partition the lag behind Kafka (offsets, and seconds while
    running), per read model its consistency watermark, the dead letters. Read from the running
    projector's metrics endpoint when it answers, else from ClickHouse (with chDB: while no
    projector runs)."""
    from projector.projector_status import collect_live_status, collect_status

    config = _config(config_file)
    report = collect_live_status(config.metrics_port) if config.metrics_port else None
    if report is None:
        try:
            report = collect_status(config)
        except ProjectorError as exc:
            _fail(str(exc))
            return
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out = Console()
    live = report["source"] != "clickhouse"
    out.print(
        f"from {'the running projector at ' if live else ''}{report['source']}", highlight=False
    )
    if live:
        tables = Table("table", "path", "events applied")
        for row in report["tables"]:
            tables.add_row(row["table"], row["path"], f"{row['events']:,}")
        batches = Table("path", "batches", "mean batch seconds")
        for path, b in report["batches"].items():
            count = b.get("batches", 0)
            batches.add_row(
                path, f"{count:,.0f}", f"{b.get('seconds', 0) / count:.3f}" if count else "-"
            )
        out.print(tables)
        out.print(batches)
        partitions = Table("topic", "partition", "lag (messages)", "lag (seconds)")
        for row in report["partitions"]:
            partitions.add_row(row["topic"], str(row["partition"]), str(row["lag"]),
                               f"{row.get('lag_seconds', 0):.1f}")  # fmt: skip
    else:
        partitions = Table("topic", "partition", "applied through", "end", "lag (messages)")
        for row in report["partitions"]:
            partitions.add_row(row["topic"], str(row["partition"]), str(row["applied_through"]),
                               str(row["end"]), str(row["lag"]))  # fmt: skip
    models = Table("read model", "watermark transaction", "watermark LSN")
    for name, model in report["read_models"].items():
        mark = model["watermark"]
        models.add_row(name, (mark["tx_id"] or "-") if mark else "-", mark["lsn"] if mark else "-")
    out.print(partitions)
    out.print(models)
    out.print(f"{report['dead_letters']} dead letter(s)", highlight=False)


@app.command("bench")
def bench(
    events: int = typer.Option(1_000_000, min=1000, help="Change events to generate."),
    seed: int = typer.Option(1, help="Random seed of the generated events."),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
    profile: Path | None = typer.Option(
        None, help="Sample (a) and (b) with py-spy into PROFILE.a / PROFILE.b (collapsed stacks)."
    ),
    batch_messages: int = typer.Option(
        50_000, min=1, help="The projector's batch size (PROJECTOR_MAX_BATCH_MESSAGES) in (a), (b)."
    ),
) -> None:
    """Measure the projector against a naive baseline and ClickHouse's own decoder, on the same
    generated events, in one run (starts the stack if needed)."""
    from projector.bench import run_bench

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    try:
        run_bench(events, seed, log, None if no_report else report, profile, batch_messages)
    except (StackError, ConnectorError, ProjectorError, RuntimeError) as exc:
        _fail(str(exc))


@app.command("freshness")
def freshness(
    rates: str = typer.Option("1000,5000", help="Write rates to measure, rows/s, comma-separated."),
    duration: float = typer.Option(20.0, min=1, help="Seconds of writing per rate."),
    burst: int = typer.Option(
        50_000, min=100, help="Rows of the unpaced burst (Debezium ceiling)."
    ),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
) -> None:
    """Commit-to-visible latency (p50/p95/p99) at fixed write rates into Postgres, through
    Debezium, Kafka and the projector into ClickHouse; and Debezium's source rate ceiling."""
    from projector.freshness import run_freshness

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    try:
        wanted = [int(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        _fail(f"--rates must be whole numbers separated by commas, got {rates!r}")
        return
    try:
        run_freshness(wanted, duration, burst, log, None if no_report else report)
    except (StackError, ConnectorError, ProjectorError, RuntimeError) as exc:
        _fail(str(exc))


@app.command("chdb-server")
def chdb_server(
    port: int = typer.Option(18123, help="Port on 127.0.0.1."),
    path: Path = typer.Option(Path(".stack/chdb-server"), help="chDB data directory."),
) -> None:
    """Serve one chDB directory over ClickHouse's HTTP interface, so that several projector
    processes (PROJECTOR_BACKEND=server, PROJECTOR_CLICKHOUSE_URL=http://127.0.0.1:PORT) share
    it; for machines without a ClickHouse server. Runs until SIGTERM / Ctrl-C."""
    import logging

    from projector.chdb_server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        serve(port, path)
    except OSError as exc:
        _fail(f"cannot serve on 127.0.0.1:{port}: {exc}")


@app.command("sql")
def sql(
    query: str = typer.Argument(
        ..., help='A read query, e.g. "SELECT * FROM replica_public.orders FINAL".'
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    config_file: Path | None = ConfigOption,
) -> None:
    """Run a read-only query on the configured ClickHouse backend."""
    from projector.clickhouse import open_backend

    formats = {"table": "PrettyCompactMonoBlock", "csv": "CSVWithNames", "json": "JSONEachRow"}
    if fmt not in formats:
        _fail(f"--format must be one of {', '.join(formats)}", code=2)
    try:
        backend = open_backend(_config(config_file))
    except ProjectorError as exc:
        _fail(str(exc))
        return
    try:
        out = backend.text(f"{query.rstrip().rstrip(';')} SETTINGS readonly = 1", formats[fmt])
    except Exception as exc:
        _fail(f"query failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}")
        return
    sys.stdout.write(out)


dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    limit: int = typer.Option(50, help="At most this many."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json (one object per line)"),
    config_file: Path | None = ConfigOption,
) -> None:
    """Dead letters not yet replayed: where they came from and why they failed."""
    from projector.clickhouse import open_backend
    from projector.dlq import DeadLetterStore

    if fmt not in ("table", "json"):
        _fail("--format must be table or json", code=2)
    config = _config(config_file)
    store = DeadLetterStore(open_backend(config), config.control_database)
    store.create()
    letters = store.list(limit)
    if fmt == "json":
        sys.stdout.writelines(json.dumps(letter) + "\n" for letter in letters)
        return
    table = Table("topic", "partition", "offset", "stage", "error", "dead at")
    for row in letters:
        table.add_row(
            row["topic"],
            str(row["partition"]),
            str(row["offset"]),
            row["stage"],
            row["error"][:120],
            row["dead_at"],
        )
    Console().print(table)
    console.print(f"{store.count()} dead letter(s) waiting", highlight=False)


@dlq_app.command("show")
def dlq_show(
    topic: str, partition: int, offset: int, config_file: Path | None = ConfigOption
) -> None:
    """One dead letter in full (bytes base64-encoded)."""
    from projector.clickhouse import open_backend
    from projector.dlq import DeadLetterStore

    config = _config(config_file)
    store = DeadLetterStore(open_backend(config), config.control_database)
    store.create()
    letter = store.get(topic, partition, offset)
    if letter is None:
        _fail(f"no dead letter at {topic}[{partition}]@{offset}", code=2)
    sys.stdout.write(json.dumps(letter, indent=2) + "\n")


@dlq_app.command("replay")
def dlq_replay(
    topic: str | None = typer.Option(None, help="Only the dead letters of this topic."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Try waiting dead letters again (after a fix or an upcaster); the ones that apply now
    leave the queue, the others stay. Exits 1 while any stays."""
    from projector.clickhouse import open_backend
    from projector.dlq_replay import replay_dead_letters

    config = _config(config_file)
    replayed, still_dead = replay_dead_letters(config, open_backend(config), topic)
    console.print(f"replayed {replayed}, still dead {still_dead}", highlight=False)
    if still_dead:
        raise typer.Exit(1)


# ---- shop (the demo application) ---------------------------------------------------------------

shop_app = typer.Typer(
    help="The demo shop: an application that writes plain SQL to Postgres.", no_args_is_help=True
)
app.add_typer(shop_app, name="shop")


def _admin_dsn() -> str:
    env = connector_environment()
    if not env.get("ADMIN_DSN"):
        _fail("no Postgres: start the local stack (projector stack up) or set ADMIN_DSN", code=2)
    return env["ADMIN_DSN"]


@shop_app.command("init")
def shop_init(
    schema: str = typer.Option("shop", help="Postgres schema of the shop's tables."),
) -> None:
    """Create the shop's tables (idempotent). Capture them with
    `projector connectors apply --capture public,shop`."""
    from projector.shop import create_shop

    create_shop(_admin_dsn(), schema)
    console.print(f"shop tables ready in schema {schema}", highlight=False)


@shop_app.command("write")
def shop_write(
    rate: float = typer.Option(20.0, help="Transactions per second (0: as fast as possible)."),
    duration: float | None = typer.Option(None, help="Stop after this many seconds."),
    transactions: int | None = typer.Option(None, help="Stop after this many transactions."),
    seed: int = typer.Option(1, help="Random seed: the same seed writes the same story."),
    schema: str = typer.Option("shop", help="Postgres schema of the shop's tables."),
) -> None:
    """Write like the shop application: orders, status changes, cancellations, renames, price
    changes, deletes. Runs until --duration, --transactions or Ctrl-C."""
    from projector.shop import ShopWriter

    if rate < 0:
        _fail("--rate must be 0 or more", code=2)
    writer = ShopWriter(_admin_dsn(), schema, seed)
    try:
        writer.run(rate_per_s=rate, duration_s=duration, transactions=transactions)
    except KeyboardInterrupt:
        pass
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(writer.stats.by_kind.items()))
    console.print(f"{writer.stats.transactions} transactions: {kinds}", highlight=False)


# ---- connectors ------------------------------------------------------------------------------

connectors_app = typer.Typer(
    help="Manage the Debezium connector through the Kafka Connect REST API.", no_args_is_help=True
)
app.add_typer(connectors_app, name="connectors")


def connector_environment() -> dict[str, str]:
    """Stack addresses (when the local stack has been set up) overlaid by the process environment."""
    import os

    env: dict[str, str] = {}
    try:
        env.update(Stack().client_environment())
    except FileNotFoundError:
        pass  # no local stack: everything must come from the environment
    env.update(os.environ)
    return env


def _connect_and_name() -> tuple[ConnectClient, str]:
    env = connector_environment()
    if "CONNECT_URL" not in env:
        _fail("CONNECT_URL is not set and no local stack exists (projector stack up)")
    return ConnectClient(env["CONNECT_URL"]), render_connector(env)["name"]


def _connector_call(action: str) -> None:
    try:
        client, name = _connect_and_name()
        getattr(client, action)(name)
    except ConnectorError as exc:
        _fail(str(exc))
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
) -> None:
    """Create or update the connector, sync the publication, snapshot newly captured tables."""
    env = connector_environment()
    if capture:
        env["CAPTURE"] = capture
    for needed in ("CONNECT_URL", "ADMIN_DSN"):
        if needed not in env:
            _fail(f"{needed} is not set and no local stack exists (projector stack up)")
    try:
        result = apply_connector(ConnectClient(env["CONNECT_URL"]), env["ADMIN_DSN"], env)
    except ConnectorError as exc:
        _fail(str(exc))
        return
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


@connectors_app.command("status")
def connectors_status(
    as_json: bool = typer.Option(False, "--json", help="Print Kafka Connect's status document."),
) -> None:
    """Show the connector's and its tasks' state. Exit 1 unless all are RUNNING."""
    try:
        client, name = _connect_and_name()
        status = client.status(name)
    except ConnectorError as exc:
        _fail(str(exc))
        return
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(f"{name}: {status['connector']['state']}\n")
        for task in status.get("tasks", []):
            sys.stdout.write(f"  task {task['id']}: {task['state']}\n")
            if task.get("trace"):
                sys.stdout.write("    " + task["trace"].splitlines()[0] + "\n")
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


if __name__ == "__main__":
    app()
