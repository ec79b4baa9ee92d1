"""The development tools as `projector` commands — the local real stack, the demo and its shop,
benchmarks, and `chdb-server` — added to the engine's command line (projector/cli/) by
`register`, the entry point `devstack` of the group `projector.commands` (pyproject.toml). One
command, a sub-command per job, `--help` everywhere.

The tools live here, above the engine, so that the engine never depends on them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

# The stack (devstack.supervisor and its settings) and the connectors package (psycopg) are
# imported by the commands that use them: every `projector` command loads this module, and
# `projector sql` or `projector run` should not pay for them (a few hundred ms of CPU each; the
# integration suite starts such commands hundreds of times).
from projector.cli import connector_environment, console, fail
from projector.errors import ProjectorError

stack_app = typer.Typer(
    help="Run the local real stack (Postgres, Kafka, Connect, registry).", no_args_is_help=True
)


@stack_app.command("up")
def stack_up() -> None:
    """Fetch what is missing, start every component, wait until all are healthy (idempotent)."""
    from devstack import Stack, StackError, healthy

    stack = Stack()
    try:
        statuses = stack.up(log=lambda m: console.print(m, highlight=False))
    except StackError as exc:
        fail(str(exc))
        return
    if not healthy(statuses):
        bad = ", ".join(f"{s.name}: {s.detail}" for s in statuses if s.state != "healthy")
        fail(f"stack is not healthy: {bad}")
    console.print("[green]stack is up[/green]; `projector stack status --json` prints addresses")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every component (data stays in the state dir; `up` resumes it)."""
    from devstack import Stack

    Stack().down(log=lambda m: console.print(m, highlight=False))


@stack_app.command("status")
def stack_status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output with addresses."),
) -> None:
    """Show each component's state and the addresses a client needs. Exit 1 if any is unhealthy."""
    from devstack import Stack, healthy

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
    from devstack import Stack

    stack = Stack()
    try:
        component = stack.component(name)
    except KeyError as exc:
        fail(str(exc.args[0]), code=2)
        return
    sys.stdout.write(stack.tail(component, lines) + "\n")
    console.print(f"(log file: {stack.log_file(component)})", highlight=False)


@stack_app.command("fetch")
def stack_fetch() -> None:
    """Download the Java pieces (Kafka, Debezium, Apicurio, converter) into the cache."""
    from devstack import StackError
    from devstack.artifacts import fetch_all
    from devstack.settings import StackSettings

    try:
        paths = fetch_all(StackSettings(), log=lambda m: console.print(m, highlight=False))
    except StackError as exc:
        fail(str(exc))
        return
    console.print(f"cached under {paths.kafka_classpath_dir.parent}", highlight=False)


def demo(
    duration: float | None = typer.Option(
        None, help="Stop after this many seconds (default: run until Ctrl-C)."
    ),
    rate: float = typer.Option(20.0, help="Shop transactions per second."),
) -> None:
    """The main job, live: stack up, the shop application writing, the projector applying on
    embedded ClickHouse, and read models with the lag refreshing until Ctrl-C."""
    from connectors import ConnectorError
    from devstack import StackError
    from devstack.demo import run_demo

    try:
        code = run_demo(console, duration_s=duration, rate=rate)
    except (StackError, ConnectorError, ProjectorError) as exc:
        fail(str(exc))
        return
    raise typer.Exit(code)


def bench(
    events: int = typer.Option(1_000_000, min=1000, help="Change events to generate."),
    seed: int = typer.Option(1, help="Random seed of the generated events."),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
    profile: Path | None = typer.Option(
        None, help="Sample (a), (b), (e) with py-spy into PROFILE.a / .b / .e (collapsed stacks)."
    ),
    batch_messages: int = typer.Option(
        50_000, min=1, help="The projector's batch size (PROJECTOR_MAX_BATCH_MESSAGES) in (a), (b)."
    ),
    only: str = typer.Option(
        "abcde", help="The contenders to run, by letter (e.g. `ae`; (e) needs (a))."
    ),
    initial_load: int | None = typer.Option(
        None,
        "--initial-load",
        min=1000,
        help="Instead: the first load of a Postgres table of this many rows (16 columns) through "
        "Debezium's snapshot into a replica and read models, end to end and per stage.",
    ),
    connector_setting: list[str] = typer.Option(
        [],
        "--connector-setting",
        help="With --initial-load: KEY=VALUE set on the benchmark's connector (repeatable), "
        "e.g. max.batch.size=8192, to compare Debezium's settings.",
    ),
) -> None:
    """Measure the projector against a naive baseline and ClickHouse's own decoder, on the same
    generated events, in one run (starts the stack if needed); or, with --initial-load, the first
    load of a big table."""
    from connectors import ConnectorError
    from devstack import StackError
    from devstack.bench import run_bench

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    try:
        if initial_load is not None:
            from devstack.initial_load_bench import run_initial_load_bench

            settings = {}
            for item in connector_setting:
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    fail(f"--connector-setting takes KEY=VALUE, got {item!r}", code=2)
                settings[key.strip()] = value.strip()
            command = f"projector bench --initial-load {initial_load}" + "".join(
                f" --connector-setting {k}={v}" for k, v in settings.items()
            )
            run_initial_load_bench(
                initial_load, log, None if no_report else report, command, settings
            )
            return
        run_bench(events, seed, log, None if no_report else report, profile, batch_messages, only)
    except (StackError, ConnectorError, ProjectorError, RuntimeError) as exc:
        fail(str(exc))


def read_model_bench(
    orders: int = typer.Option(10_000_000, min=1000, help="Orders in the generated replicas."),
    write_events: int = typer.Option(
        1_000_000, min=1000, help="Change events of the maintenance on/off comparison."
    ),
    rate: int = typer.Option(1000, min=1, help="Orders/s written during the freshness probe."),
    parts: str = typer.Option(
        "read,api,write,freshness",
        help="Which parts: read (latency, materialized vs views), api (named queries through the "
        "HTTP API over them), write (maintenance on/off), freshness.",
    ),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
) -> None:
    """Materialized read models against the views over the replicas they replaced: latency at
    10M orders, projector throughput with maintenance on and off, and freshness into
    daily_sales (starts the stack for the last two)."""
    from connectors import ConnectorError
    from devstack import StackError
    from devstack.read_model_bench import run_read_model_bench

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    wanted = {p.strip() for p in parts.split(",") if p.strip()}
    unknown = wanted - {"read", "api", "write", "freshness"}
    if unknown:
        fail(f"--parts: unknown {', '.join(sorted(unknown))} (read, api, write, freshness)")
    command = (
        f"projector read-model-bench --orders {orders} --write-events {write_events} "
        f"--rate {rate} --parts {','.join(sorted(wanted))}"
    )
    try:
        run_read_model_bench(
            orders, write_events, rate, log, None if no_report else report, command, wanted
        )
    except (StackError, ConnectorError, ProjectorError, RuntimeError) as exc:
        fail(str(exc))


def rebuild_bench(
    orders: int = typer.Option(1_000_000, min=1000, help="Orders in the generated replicas."),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
) -> None:
    """`projector rebuild` of every read-model family over generated replicas, against the
    first build of the same read models in the same run."""
    from devstack.rebuild_bench import run_rebuild_bench

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    run_rebuild_bench(
        orders, log, None if no_report else report, f"projector rebuild-bench --orders {orders}"
    )


def freshness(
    rates: str = typer.Option("1000,5000", help="Write rates to measure, rows/s, comma-separated."),
    duration: float = typer.Option(20.0, min=1, help="Seconds of writing per rate."),
    burst: int = typer.Option(
        50_000, min=100, help="Rows of the unpaced burst (Debezium ceiling)."
    ),
    ceiling: bool = typer.Option(
        True,
        "--ceiling/--no-ceiling",
        help="After the burst, runs paced from its rate down until Debezium keeps up for a "
        "whole run (its sustained ceiling).",
    ),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
) -> None:
    """Commit-to-visible latency (p50/p95/p99) at fixed write rates into Postgres, through
    Debezium, Kafka and the projector into a replica and a read model kept beside it; Debezium's
    source rate ceiling, and the latency at that ceiling."""
    from connectors import ConnectorError
    from devstack import StackError
    from devstack.freshness import run_freshness

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    try:
        wanted = [int(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        fail(f"--rates must be whole numbers separated by commas, got {rates!r}")
        return
    try:
        run_freshness(wanted, duration, burst, log, None if no_report else report, ceiling)
    except (StackError, ConnectorError, ProjectorError, RuntimeError) as exc:
        fail(str(exc))


def query_bench(
    transactions: int = typer.Option(5_000, min=100, help="Shop transactions to project first."),
    requests: int = typer.Option(200, min=10, help="Sequential requests per query and mode."),
    clients: int = typer.Option(8, min=1, help="Connections of the load generator (wrk)."),
    seconds: float = typer.Option(10.0, min=1, help="Seconds of load per mode."),
    report: Path = typer.Option(Path("docs/benchmarks.md"), help="Append the results here."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print the results."),
) -> None:
    """The query service: named-query latency (p50/p99) through the HTTP API and requests/s
    under a local load generator, cache on and off, against baselines of the same run."""
    from connectors import ConnectorError
    from devstack import StackError
    from devstack.query_bench import run_query_bench

    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    try:
        run_query_bench(
            transactions, requests, clients, seconds, log, None if no_report else report
        )
    except (StackError, ConnectorError, ProjectorError, RuntimeError) as exc:
        fail(str(exc))


def chdb_server(
    port: int = typer.Option(18123, help="Port on 127.0.0.1."),
    path: Path = typer.Option(Path(".stack/chdb-server"), help="chDB data directory."),
) -> None:
    """Serve one chDB directory over ClickHouse's HTTP interface, so that several projector
    processes (PROJECTOR_BACKEND=server, PROJECTOR_CLICKHOUSE_URL=http://127.0.0.1:PORT) share
    it; for machines without a ClickHouse server. Runs until SIGTERM / Ctrl-C.

    It needs a password: PROJECTOR_CLICKHOUSE_PASSWORD (the environment, else the stack's
    client.env, which `projector stack up` writes: the projectors read the same), else the one
    in .stack/chdb-server.password (generated when missing)."""
    import logging

    from devstack.chdb_server import serve, stack_password
    from devstack.settings import StackSettings
    from projector.config import client_environment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    password = client_environment().get("PROJECTOR_CLICKHOUSE_PASSWORD") or stack_password(
        StackSettings().state_dir
    )
    try:
        serve(port, path, password)
    except OSError as exc:
        fail(f"cannot serve on 127.0.0.1:{port}: {exc}")


# ---- shop (the demo application) ---------------------------------------------------------------

shop_app = typer.Typer(
    help="The demo shop: an application that writes plain SQL to Postgres.", no_args_is_help=True
)


def _admin_dsn() -> str:
    env = connector_environment()
    if not env.get("ADMIN_DSN"):
        fail("no Postgres: start the local stack (projector stack up) or set ADMIN_DSN", code=2)
    return env["ADMIN_DSN"]


@shop_app.command("init")
def shop_init(
    schema: str = typer.Option("shop", help="Postgres schema of the shop's tables."),
) -> None:
    """Create the shop's tables (idempotent). Capture them with
    `projector connectors apply --capture public,shop`."""
    from devstack.shop import create_shop

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
    from devstack.shop import ShopWriter

    if rate < 0:
        fail("--rate must be 0 or more", code=2)
    writer = ShopWriter(_admin_dsn(), schema, seed)
    try:
        writer.run(rate_per_s=rate, duration_s=duration, transactions=transactions)
    except KeyboardInterrupt:
        pass
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(writer.stats.by_kind.items()))
    console.print(f"{writer.stats.transactions} transactions: {kinds}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the tools to the engine's `app`, after its own commands, in the order `projector
    --help` lists them."""
    app.add_typer(stack_app, name="stack")
    app.command("demo")(demo)
    app.command("bench")(bench)
    app.command("read-model-bench")(read_model_bench)
    app.command("rebuild-bench")(rebuild_bench)
    app.command("freshness")(freshness)
    app.command("query-bench")(query_bench)
    app.command("chdb-server")(chdb_server)
    app.add_typer(shop_app, name="shop")


if __name__ == "__main__":  # `python -m devstack.cli ...`: the whole `projector` command
    from projector.cli import app

    app()
