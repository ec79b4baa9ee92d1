"""`projector reset SCHEMA.TABLE --to-offset N | --to-time T` (projector/operations/offset_reset.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from projector.cli.common import ConfigOption, console, fail, load_settings


def reset(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    to_offset: int | None = typer.Option(
        None, "--to-offset", help="Re-read from this Kafka offset."
    ),
    to_time: str | None = typer.Option(
        None,
        "--to-time",
        help="Re-read from the first event at or after this ISO-8601 time (UTC without a zone).",
    ),
    partition: list[int] | None = typer.Option(
        None, "--partition", help="Only this partition (repeatable; default: all)."
    ),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation (scripts)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Make a replica table re-read its topic from an offset (or a time), exactly once, while the
    running projector keeps serving it and applying every other table. Moving back is safe: the
    replica and the read models it feeds stay exact throughout (newer rows win over re-read ones).
    Moving forward SKIPS events and leaves the table wrong until they are re-read (`projector
    verify` shows it). With a ClickHouse server the running projector pauses the table, moves,
    and resumes it; with chDB stop the projector first. (`projector table reset` is another
    thing: it drops a stopped table and re-snapshots it.)"""
    from projector.errors import ResetRefused
    from projector.operations.offset_reset import move, prepare

    config = load_settings(config_file)
    schema, _, name = table.partition(".")
    if not schema or not name:
        fail(f"{table!r}: give the source table as SCHEMA.TABLE", code=2)
    if (to_offset is None) == (to_time is None):
        fail("give one of --to-offset N or --to-time ISO-8601", code=2)
    try:
        prepared = prepare(config, table, to_offset, to_time, partition)
    except ResetRefused as exc:
        fail(str(exc), code=2)
        raise
    the_plan = prepared.plan
    for line in the_plan.lines():
        console.print(line, highlight=False, markup=False)
    if dry_run:
        return
    if not any(m.replayed or m.skipped for m in the_plan.moves):
        console.print("nothing to move")
        return
    running = prepared.pauses is not None
    if not running:
        console.print(
            "no projector is running (chDB, or none in the group): the next "
            "`projector run` starts there"
        )
    question = f"move {table} FORWARD, skipping events?" if the_plan.forward else f"reset {table}?"
    if not yes and not typer.confirm(question):
        raise typer.Exit(1)
    try:
        done = move(
            the_plan,
            prepared.checkpoints,
            prepared.pauses,
            say=lambda line: console.print(line, highlight=False),
        )
    except ResetRefused as exc:
        fail(str(exc))
        raise
    for m in done.moves:
        console.print(
            f"partition {m.partition}: moved from offset {m.current:,} to {m.target:,}",
            highlight=False,
        )
    replayed, skipped = sum(m.replayed for m in done.moves), sum(m.skipped for m in done.moves)
    who = "the projector" if running else "the next `projector run`"
    if replayed:
        console.print(
            f"{who} re-reads {replayed:,} event(s) (`projector status` shows the lag; "
            "metric projector_events_reread_total)",
            highlight=False,
        )
    if skipped:
        console.print(
            f"{skipped:,} event(s) skipped: `projector verify {table}` shows what the table misses",
            highlight=False,
        )
