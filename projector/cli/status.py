"""`projector status`: every projection on one line, then the source side."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from projector.cli.common import ConfigOption, fail, load_settings, stdout_console
from projector.errors import ProjectorError


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

    config = load_settings(config_file)

    def report() -> dict[str, Any]:
        try:
            return status_report(config)
        except ProjectorError as exc:
            fail(str(exc))
            raise

    if as_json:
        sys.stdout.write(json.dumps(report(), indent=2, default=str) + "\n")
        return
    out = stdout_console()
    if not watch:
        out.print(status_view(report()))
        return
    from rich.live import Live

    try:
        with Live(status_view(report()), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(status_view(report()), refresh=True)
    except KeyboardInterrupt:
        pass


def status_view(report: dict[str, Any]) -> Any:
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
            row["name"],
            row["kind"].replace("read model", "model"),
            row["state"],
            row.get("watermark_lsn") or "-",
            "-" if age is None else f"{age:.1f}s",
            f"{row['lag_events']:,}",
            "-" if seconds is None else f"{seconds:.1f}",
            str(row["dead_letters"]),
            row.get("last_error") or "",
        )
    side = report.get("source_side", {})
    slot, connector = side.get("replication_slot", {}), side.get("connector", {})
    source = Table(title="source", title_justify="left", show_header=False)
    source.add_column(overflow="fold")
    source.add_column(overflow="fold")
    if "retained_wal_bytes" in slot:
        from projector.operations.status import format_bytes

        text = (
            f"{slot['name']}: {slot['state']}, retains "
            f"{format_bytes(slot['retained_wal_bytes'] or 0)} of WAL"
        )
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
