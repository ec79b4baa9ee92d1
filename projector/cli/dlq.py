"""`projector dlq list | show | replay`: the dead letters."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.table import Table

from projector.cli.common import ConfigOption, console, fail, load_settings, stdout_console
from projector.errors import ProjectorError
from projector.redaction import configure_logging
from schemas.errors import RegistryUnavailable

dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)


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
    config = load_settings(config_file)
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
    stdout_console().print(table)
    console.print(f"{store.count()} dead letter(s) waiting", highlight=False)


@dlq_app.command("show")
def dlq_show(
    topic: str, partition: int, offset: int, config_file: Path | None = ConfigOption
) -> None:
    """One dead letter in full (bytes base64-encoded)."""
    from projector.commit.dead_letters import DeadLetterStore
    from projector.config import open_backend

    config = load_settings(config_file)
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
    config = load_settings(config_file)
    try:
        replayed, still_dead = replay_dead_letters(config, open_backend(config), topic)
    except (ProjectorError, RegistryUnavailable) as exc:  # nothing replayed is lost: run again
        fail(f"{exc} (the letters not replayed yet stay in the DLQ; run it again)")
        return
    console.print(f"replayed {replayed}, still dead {still_dead}", highlight=False)
    if still_dead:
        raise typer.Exit(1)
