"""`projector read-models list | reconcile`: the materialized read models' versions, and a check
against their definitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from projector.cli.common import ConfigOption, console, fail, load_settings
from projector.errors import ProjectorError

if TYPE_CHECKING:
    from projector.read_models.maintenance import ReadModelMaintainer

read_models_app = typer.Typer(
    help="The materialized read models: their versions and a check against their definitions.",
    no_args_is_help=True,
)


def open_maintainer(config_file: Path | None) -> ReadModelMaintainer:
    """The read models' maintainer, knowing their versions; fails when this configuration keeps
    no read models."""
    from projector.config import open_backend
    from projector.read_models.maintenance import maintainer_for

    config = load_settings(config_file)
    try:
        maintainer = maintainer_for(config, open_backend(config))
    except ProjectorError as exc:
        fail(str(exc))
    if maintainer is None:
        fail("this configuration does not keep read models (maintain_read_models = false)")
        raise typer.Exit(1)
    maintainer.family_versions.ensure_known()
    return maintainer


@read_models_app.command("list")
def read_models_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Each read-model family: the version serving, the version building (with its backfill
    progress), or the error that stopped it."""
    rows = open_maintainer(config_file).family_versions.versions()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("family", "version", "state", "backfill", "models", "error")
    for row in rows:
        table.add_row(
            row["family"],
            row["version"],
            row["state"],
            row["backfill"],
            ", ".join(row["models"]),
            row["error"][:80],
        )
    console.print(table)


@read_models_app.command("reconcile")
def read_models_reconcile(
    limit: int = typer.Option(10, min=1, help="Differing rows shown per read model."),
    config_file: Path | None = ConfigOption,
) -> None:
    """Compare every serving read model with its definition evaluated over the replicas now
    (run it while the projector is stopped, or they may differ by the batch in flight). Exits 1
    with the differing rows when any read model drifted."""
    found = open_maintainer(config_file).family_versions.reconcile(limit)
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
