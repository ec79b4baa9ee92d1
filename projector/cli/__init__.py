"""The `projector` command (the entry point `projector.cli:app`). A module per command group:

  common.py       the console, `fail`, the options every command shares, the settings loader
  run.py          run
  status.py       status
  serving.py      sql, serve, query
  dlq.py          dlq list | show | replay
  tables.py       table reset, pause, resume
  read_models.py  read-models list | reconcile
  verify.py       verify
  rebuild.py      rebuild
  reset.py        reset
  connectors.py   connectors apply | status | pause | resume | restart | delete

A command parses its options, calls the engine (projector/operations/, projector/run/,
queries/, connectors/) and prints what it got; the work is the engine's.

Other packages add commands through the entry-point group `projector.commands`: each entry is a
function `register(app)` that adds its typer commands and groups to `app`. devstack/cli.py adds
the development tools that way (the local stack, the demo and its shop, benchmarks); the engine
never imports them. `app` is built on first use, not at import, so that a plugin may import
this package (`console`, `fail`) while it is loaded.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from projector.cli import (
    connectors,
    dlq,
    read_models,
    rebuild,
    reset,
    run,
    serving,
    status,
    tables,
    verify,
)
from projector.cli.common import (
    ConfigOption,
    QueryHostOption,
    QueryPortOption,
    console,
    fail,
    load_settings,
)
from projector.cli.connectors import connector_environment
from projector.redaction import redacting_excepthook

PLUGINS = "projector.commands"  # the entry-point group of the commands other packages add

# A crash prints a plain traceback through `redacting_excepthook`: typer's own would show local
# variables (a configuration holds passwords) and bypass the redaction.
sys.excepthook = redacting_excepthook


def _build() -> typer.Typer:
    app = typer.Typer(
        help="CDC projection engine: Postgres → Debezium → Kafka → ClickHouse.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,  # see `sys.excepthook` above
    )
    # In the order `projector --help` lists them: the commands, then the groups.
    app.command("run")(run.run)
    app.command("status")(status.status)
    app.command("sql")(serving.sql)
    app.command("serve")(serving.serve)
    app.command("query")(serving.query)
    app.command("verify")(verify.verify)
    app.command("rebuild")(rebuild.rebuild)
    app.command("pause")(tables.pause)
    app.command("resume")(tables.resume)
    app.command("reset")(reset.reset)
    app.add_typer(dlq.dlq_app, name="dlq")
    app.add_typer(tables.table_app, name="table")
    app.add_typer(read_models.read_models_app, name="read-models")
    app.add_typer(connectors.connectors_app, name="connectors")
    for plugin in entry_points(group=PLUGINS):
        plugin.load()(app)
    return app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        app = globals()["app"] = _build()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfigOption",
    "QueryHostOption",
    "QueryPortOption",
    "app",
    "connector_environment",
    "console",
    "fail",
    "load_settings",
]
