"""One replica table at a time: `projector table reset`, `projector pause`, `projector resume`."""

from __future__ import annotations

from pathlib import Path

import typer

from projector.cli.common import ConfigOption, console, fail, load_settings
from projector.config import client_environment

table_app = typer.Typer(help="One replica table at a time.", no_args_is_help=True)


@table_app.command("reset")
def table_reset(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    snapshot: bool = typer.Option(True, help="Ask Debezium for a snapshot of it (ADMIN_DSN)."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Rebuild a stopped table (its topic was re-created or re-partitioned, or its key schema
    changed): drop its replica, resume its topic at the end, and re-snapshot it through Debezium.
    Stop every `projector run` first."""
    from projector.kafka import table_topic
    from projector.operations.table_reset import end_offsets, request_snapshot, reset_stopped_table

    config = load_settings(config_file)
    schema, _, name = table.partition(".")
    if not schema or not name:
        fail(f"{table!r}: give the source table as SCHEMA.TABLE", code=2)
    topic = table_topic(config.topic_prefix, table)
    ends = end_offsets(config, topic)
    if ends is None:
        fail(f"Kafka has no topic {topic}", code=2)
        return
    done = reset_stopped_table(config, table, topic, ends)
    console.print(f"{done.replica} dropped; {done.topic} resumes at {done.ends}", highlight=False)
    if not snapshot:
        return
    dsn = client_environment().get("ADMIN_DSN") or ""
    if not dsn:
        fail(
            "no ADMIN_DSN: ask Debezium for an incremental snapshot of the table yourself "
            "(a row in its signal table, docs/troubleshooting.md)"
        )
    signal = request_snapshot(dsn, table, config.publication)
    console.print(f"incremental snapshot of {table} requested (signal {signal})", highlight=False)


def pause(
    table: str = typer.Argument(..., help="The source table, SCHEMA.TABLE."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Stop applying a table's changes (its replica and the read models it feeds hold where they
    are, their watermarks too) until `projector resume`. The running projector pauses it after
    the batch in flight; a projector started later starts with it paused."""
    _set_pause(table, True, yes, config_file)


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

    config = load_settings(config_file)
    if "." not in table:
        fail(f"{table!r}: give the source table as SCHEMA.TABLE", code=2)
    verb = "pause" if paused else "resume"
    if not yes and not typer.confirm(f"{verb} {table}?"):
        raise typer.Exit(1)
    pauses = TablePauses(open_backend(config), config.control_database)
    pauses.create()
    pauses.want(table, paused)
    console.print(
        f"{table}: {verb} recorded; the projector {'pauses' if paused else 'resumes'} "
        "it after the batch in flight (`projector status` shows it)",
        highlight=False,
    )
