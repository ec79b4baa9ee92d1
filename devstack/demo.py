"""`projector demo`: the main job, live, on the local stack and the embedded ClickHouse engine.

1. start the stack (idempotent), create the shop's tables, apply the connector (schemas `public`
   and `shop`);
2. run the shop writer (devstack/shop.py) in a thread: an unchanged application writing SQL;
3. run the projector in this process on chDB; a reader thread of its own reads a few read models
   (precomputed tables: milliseconds) and the lag every second, and the projector's loop only
   hands the newest snapshot to the terminal between rounds of batches — it never waits for a
   query — until Ctrl-C (or `--duration`). When standard output is not a terminal
   (`make demo | tee demo.log`, CI logs) a plain progress line every few seconds instead: a live
   view draws nothing there;
4. print a one-line summary.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from connectors import ConnectClient, apply_connector
from devstack import Stack
from devstack.shop import ShopWriter, create_shop
from projector.clickhouse import ClickHouse
from projector.config import client_environment, load_config, open_backend
from projector.run.loop import Projector

REFRESH_S = 1.0  # the live view's redraw
PROGRESS_S = 5.0  # a plain progress line, when standard output is not a terminal

# The read models on show: (title, name, rows shown in the live view).
PANELS = [
    ("orders by status", "orders_by_status", "ORDER BY status"),
    ("daily sales (last 3 days)", "daily_sales", "ORDER BY day DESC LIMIT 3"),
    ("top products", "product_popularity", "ORDER BY revenue DESC LIMIT 3"),
    ("top customers", "customer_lifetime_value", "ORDER BY revenue DESC LIMIT 3"),
]


class DemoView:
    """A few read models and the lag, read from the projector's own ClickHouse session."""

    def __init__(self, ch: ClickHouse, read_models: str, replica: str) -> None:
        self.ch, self.read_models, self.replica = ch, read_models, replica
        self.started = time.monotonic()

    def _table(self, title: str, query: str) -> Table:
        table = Table(title=title, title_justify="left")
        try:
            rows = self.ch.rows(query)
        except Exception:  # the view appears with the first events of its sources
            table.add_column("waiting for the first events ...")
            return table
        for column in rows[0] if rows else ["(no rows yet)"]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(_cell(v) for v in row.values()))
        return table

    def lag_seconds(self) -> float | None:
        try:
            rows = self.ch.rows(
                f"SELECT toUnixTimestamp64Milli(max(_commit_ts)) AS ms FROM `{self.replica}`.orders"
            )
        except Exception:
            return None
        newest = int(rows[0]["ms"]) if rows and rows[0]["ms"] else 0
        return None if newest == 0 else max(0.0, time.time() - newest / 1000)

    def _status(self, projector: Projector, writer: ShopWriter) -> str:
        lag = self.lag_seconds()
        return (
            f"{time.monotonic() - self.started:5.0f}s  writer: {writer.stats.transactions} tx  "
            f"projector: {projector.batches.applied_events} events applied, "
            f"{projector.batches.dead_letters} dead letters  lag: "
            + ("-" if lag is None else f"{lag:.1f}s")
        )

    def render(self, projector: Projector, writer: ShopWriter) -> Group:
        header = Text.assemble(
            ("cdc-projector demo  ", "bold"),
            self._status(projector, writer) + "   (Ctrl-C to stop)",
        )
        return Group(
            header,
            *(
                self._table(title, f"SELECT * FROM `{self.read_models}`.{name} {rows}")
                for title, name, rows in PANELS
            ),
        )

    def progress_line(self, projector: Projector, writer: ShopWriter) -> str:
        """One plain line: the live view's header and the read models' row counts."""
        counts = ", ".join(f"{name} {self._count(name)}" for _, name, _ in PANELS)
        status = self._status(projector, writer)
        return f"{datetime.now(tz=UTC):%H:%M:%S} {status}  read models (rows): {counts}"

    def _count(self, name: str) -> str:
        try:
            rows = self.ch.rows(f"SELECT count() AS n FROM `{self.read_models}`.{name}")
        except Exception:  # the view appears with the first events of its sources
            return "-"
        return str(rows[0]["n"]) if rows else "-"


class ViewReader:
    """Reads the view on a thread of its own and keeps the newest snapshot: the projector's loop
    only takes what is there (`latest`), so a query never holds up consuming or applying."""

    def __init__(self, produce: Callable[[], Any], every_s: float) -> None:
        self._produce, self._every_s = produce, every_s
        self._latest: Any = None
        self._fresh = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="demo-view", daemon=True)

    def __enter__(self) -> ViewReader:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            snapshot = self._produce()
            with self._lock:
                self._latest, self._fresh = snapshot, True
            self._stop.wait(self._every_s)

    def latest(self) -> Any:
        """The newest snapshot not handed out yet, or None."""
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._latest


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def run_demo(console: Console, duration_s: float | None = None, rate: float = 20.0) -> int:
    stack = Stack()
    stack.up(log=lambda m: console.print(m, highlight=False))
    env = {**client_environment(), "CAPTURE": "public,shop"}
    create_shop(env["ADMIN_DSN"])
    result = apply_connector(ConnectClient(env["CONNECT_URL"]), env["ADMIN_DSN"], env)
    console.print(f"connector {result.connector} is RUNNING, capturing {len(result.tables)} tables")

    log_file = stack.settings.logs_dir / "demo-projector.log"
    logging.basicConfig(
        filename=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    console.print(f"projector log: {log_file}", highlight=False)
    config = load_config()
    tables = f" (tables matching {config.table_pattern})" if config.table_pattern != "[^.]+" else ""
    console.print(
        f"projecting schemas {', '.join(config.schemas)}{tables} of the stack in "
        f"{stack.settings.state_dir}",
        highlight=False,
    )
    projector = Projector(config, open_backend(config))
    writer = ShopWriter(env["ADMIN_DSN"], seed=random.randrange(1 << 30))
    stop_writer = threading.Event()
    thread = threading.Thread(
        target=writer.run, kwargs={"rate_per_s": rate, "stop": stop_writer.is_set}, daemon=True
    )
    thread.start()
    view = DemoView(
        projector.parts.ch,
        config.read_model_database,
        projector.parts.applier.catalog.database_for(config.read_model_schema),
    )
    stop_at = None if duration_s is None else time.monotonic() + duration_s
    out = Console()  # standard output: the view
    if out.is_terminal:
        with (
            ViewReader(lambda: view.render(projector, writer), REFRESH_S) as reader,
            Live(console=out, auto_refresh=False) as live,
        ):

            def redraw() -> None:
                snapshot = reader.latest()
                if snapshot is not None:
                    live.update(snapshot, refresh=True)

            code = projector.run(tick=redraw, stop_at=stop_at)
    else:
        # No terminal (a pipe, a CI log): a live view would draw nothing until the end.
        console.print(
            f"standard output is not a terminal: a progress line every {PROGRESS_S:.0f}s",
            highlight=False,
        )
        with ViewReader(lambda: view.progress_line(projector, writer), PROGRESS_S) as reader:

            def report() -> None:
                line = reader.latest()
                if line is not None:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()

            code = projector.run(tick=report, stop_at=stop_at)
    stop_writer.set()
    thread.join(10)
    console.print()
    lag = view.lag_seconds()
    console.print(
        f"{datetime.now(tz=UTC):%H:%M:%S} demo stopped: the shop wrote "
        f"{writer.stats.transactions} transactions, the projector applied "
        f"{projector.batches.applied_events} events ({projector.batches.dead_letters} dead letters), "
        f"last lag {'-' if lag is None else f'{lag:.1f}s'}. Query on: projector sql "
        f'"SELECT * FROM {config.read_model_database}.order_summary LIMIT 10" '
        "(the stack keeps running: projector stack down)",
        highlight=False,
    )
    return code
