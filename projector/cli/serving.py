"""The read side from the command line: `projector sql`, `projector query`, and `projector serve`
(the query service, queries/)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from projector.cli.common import (
    ConfigOption,
    QueryHostOption,
    QueryPortOption,
    console,
    fail,
    load_settings,
)
from projector.config import ProjectorConfig
from projector.errors import ProjectorError
from projector.redaction import configure_logging

FormatOption = typer.Option(
    "table", "--format", "-f", help="table | csv | json (one object per line)"
)


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
        config = load_settings(config_file)
        backend = open_backend(config)
    except ProjectorError as exc:
        fail(str(exc))
        return
    # The operator's command: any database, the engine's limits of memory and bytes, and the
    # rows and time asked for; the functions ad-hoc SQL may use are the same as POST /sql's.
    limits = replace(
        sql_limits(config),
        max_rows=max_rows,
        max_seconds=max_seconds,
        max_result_bytes=max(sql_limits(config).max_result_bytes, 1024**3),
    )
    try:
        lines = run_read_only(backend, query, limits)
    except QueryError as exc:
        fail(exc.message, code=2 if exc.status < 500 else 1)
        return
    _write_rows(lines, fmt)


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
    config = load_settings(config_file)
    try:
        run_server(
            config, open_backend(config), host or config.query_host, port or config.query_port
        )
    except ProjectorError as exc:
        fail(str(exc))


def query(
    name: str = typer.Argument(
        ..., help="A named query, or `list` for all of them and their parameters."
    ),
    param: list[str] = typer.Option([], "--param", "-p", help="A parameter as k=v (repeat)."),
    fmt: str = FormatOption,
    limit: int = typer.Option(100, min=1, help="Rows per page."),
    offset: int = typer.Option(0, min=0, help="Rows to skip."),
    min_lsn: str | None = typer.Option(
        None, help="Wait until the read model shows everything committed up to this LSN."
    ),
    url: str | None = typer.Option(
        None,
        envvar="PROJECTOR_API_URL",
        help="Ask a running query service (e.g. http://127.0.0.1:18000; token from "
        "PROJECTOR_API_TOKEN) instead of opening ClickHouse here: the way while "
        "`projector run --serve` holds a chDB directory.",
    ),
    config_file: Path | None = ConfigOption,
) -> None:
    """Run a named query (queries/sql/NAME.sql), as GET /queries/NAME does. `projector query
    list` prints every query and its parameters."""
    from queries.client import StillProcessing
    from queries.errors import QueryError

    if fmt not in ("table", "csv", "json"):
        fail("--format must be one of table, csv, json", code=2)
    params = {}
    for item in param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param takes k=v, got {item!r}", code=2)
        params[key.strip()] = value
    config = load_settings(config_file)
    try:
        if url:
            lines, watermark = _query_over_http(url, config, name, params, limit, offset, min_lsn)
        else:
            lines, watermark = _query_here(config, name, params, limit, offset, min_lsn)
    except StillProcessing as exc:
        fail(str(exc), code=3)
        return
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
    config: ProjectorConfig,
    name: str,
    params: dict[str, str],
    limit: int,
    offset: int,
    min_lsn: str | None,
) -> tuple[list[str], str | None]:
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
        fail(
            f"still processing: the read model is at {result.watermark.lsn_text}, not yet at "
            f"{min_lsn}; try again",
            code=3,
        )
        raise AssertionError
    return result.rows.lines, result.watermark.lsn_text if result.watermark.lsn else None


def _query_list(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "query": q["name"],
            "description": q["description"],
            "parameters": ", ".join(
                f"{p['name']} {p['type']}" + ("" if p["required"] else " (optional)")
                for p in q["parameters"]
            ),
        }
        for q in described
    ]


def _query_over_http(
    url: str,
    config: ProjectorConfig,
    name: str,
    params: dict[str, str],
    limit: int,
    offset: int,
    min_lsn: str | None,
) -> tuple[list[str], str | None]:
    from queries import client

    token = config.api_token or ""
    if name == "list":
        return [json.dumps(q) for q in _query_list(client.list_queries(url, token))], None
    rows, watermark = client.named_query(url, token, name, params, limit, offset, min_lsn)
    return [json.dumps(row) for row in rows], watermark
