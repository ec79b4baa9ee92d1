"""What every command of `projector` shares: the console it reports on, `fail`, the options
that mean the same on every command, and the settings loader."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from projector.config import ProjectorConfig, load_config
from projector.errors import ConfigError
from projector.read_models.definitions import load_read_models
from projector.redaction import redact

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {redact(message)}", highlight=False)
    raise typer.Exit(code)


def stdout_console() -> Console:
    """A console on stdout for tables: a terminal's width, else (a pipe or a log) wide."""
    return Console() if sys.stdout.isatty() else Console(width=140)


ConfigOption = typer.Option(None, "--config", help="TOML file with projector settings.")
# Where the query service listens: the same flags on `serve` and `run --serve`.
QueryHostOption = typer.Option(
    None, "--host", help="Address the query service listens on (PROJECTOR_QUERY_HOST)."
)
QueryPortOption = typer.Option(
    None, "--port", min=1, max=65535, help="Port of the query service (PROJECTOR_QUERY_PORT)."
)


def load_settings(path: Path | None) -> ProjectorConfig:
    """The settings, with their read-model definitions checked: a broken definition file stops
    every command at start-up, not a batch."""
    try:
        config = load_config(path)
        load_read_models(config.read_models_file)
        return config
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise
