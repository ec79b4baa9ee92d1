"""`projector verify`: ClickHouse reconciled with Postgres (projector/operations/verify.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from projector.cli.common import ConfigOption, console, fail, load_settings
from projector.config import client_environment


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
        open_clickhouse,
        read_model_maintainer,
        serving_read_models,
        source_snapshot,
        verify_read_models,
    )
    from projector.read_models.stage import moving_now

    if (name is None) == (not every):
        fail("give one NAME (SCHEMA.TABLE or a read model) or --all", code=2)
    config = load_settings(config_file)
    projector_may_run = config.backend == "server"
    verdicts: list[Verdict] = []
    skipped: dict[str, str] = {}
    try:
        ch = open_clickhouse(config)
        with (
            source_snapshot(config, client_environment().get("ADMIN_DSN")) as snapshot,
            _verify_progress() as progress,
        ):
            verifier = TableVerifier(config, ch, snapshot, projector_may_run, progress)
            tables = verifier.replica_tables()
            maintainer = read_model_maintainer(config, ch)
            models = serving_read_models(maintainer)
            if name is not None and name not in tables and name not in models:
                fail(
                    f"{name!r} is neither a replica table nor a serving read model; replica "
                    f"tables: {', '.join(tables) or 'none'}; read models: "
                    f"{', '.join(models) or 'none'}",
                    code=2,
                )
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
            if maintainer is not None and models and (name is None or name in models):
                progress("read models: comparing with their definitions")
                wanted = None if name is None else {name}
                moving = moving_now(config, ch, maintainer.sources())
                verdicts += verify_read_models(maintainer, wanted, projector_may_run, moving=moving)
                progress("done", completed=len(plans) + 1)
    except VerifyError as exc:
        fail(str(exc), code=2)
    if not verdicts and not skipped:
        fail(
            "nothing to verify: no replica table or read model in ClickHouse (is this the "
            "projector's configuration? `projector status` shows what it applied)",
            code=2,
        )
    _print_verdicts(verdicts, skipped, as_json)
    if not all(v.equal for v in verdicts):
        raise typer.Exit(1)


@contextmanager
def _verify_progress() -> Iterator[Callable[..., None]]:
    """A bar of the tables (and read models) compared, with the step verify is at, when stdout
    is a terminal; else nothing. Call it as `progress(step, total=n, completed=n)`."""
    if not Console().is_terminal:
        yield lambda *_, **__: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("verifying", total=None)

        def progress(step: str, total: int | None = None, completed: int | None = None) -> None:
            bar.update(task, description=step, total=total, completed=completed)

        yield progress


def _print_verdicts(verdicts: list[Any], skipped: dict[str, str], as_json: bool) -> None:
    if as_json:
        report = {
            "equal": all(v.equal for v in verdicts),
            "results": [v.as_json() for v in verdicts],
            "skipped": skipped,
        }
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
            out.print(
                f"       ... and {v.ranges_not_listed:,} more differing key ranges (keys "
                "not listed: repair the table, then verify again)",
                markup=False,
            )
        if v.not_compared:
            out.print(f"       not compared: {', '.join(v.not_compared)}", markup=False)
    for table, reason in skipped.items():
        out.print(f"skip   table {table}: {reason}", markup=False)
