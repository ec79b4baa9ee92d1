"""`projector demo`: the walking skeleton end to end, on the local stack.

1. start the stack (idempotent) and apply the connector;
2. create a small `demo_products` table if it is missing, and write, change and delete rows in it
   like an ordinary application would;
3. read the table's topic from the start and print every decoded change event.
"""

from __future__ import annotations

import time
import uuid

import psycopg
from rich.console import Console
from rich.table import Table

from connectors import ConnectClient, apply_connector
from projector.stack import Stack
from projector.topic_reader import read_topic_until
from schemas import ChangeEvent, EventDecoder

DEMO_TABLE = "demo_products"


def write_sample_rows(admin_dsn: str) -> int:
    """One small burst of application-like writes; returns the id of the row it deleted."""
    tag = uuid.uuid4().hex[:6]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                f"INSERT INTO {DEMO_TABLE} (name, price) VALUES (%s, 9.99), (%s, 24.50), (%s, 3.20)"
                " RETURNING id",
                [f"lamp-{tag}", f"chair-{tag}", f"mug-{tag}"],
            )
        ]
        conn.execute(f"UPDATE {DEMO_TABLE} SET price = price * 1.10 WHERE id = %s", [ids[0]])
        conn.execute(f"DELETE FROM {DEMO_TABLE} WHERE id = %s", [ids[2]])
    return ids[2]


def run_demo(console: Console) -> int:
    stack = Stack()
    stack.up(log=lambda m: console.print(m, highlight=False))
    env = {**stack.client_environment(), "CAPTURE": "public"}
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {DEMO_TABLE} (id serial PRIMARY KEY, name text NOT NULL,"
            " price numeric(10,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
        )
    result = apply_connector(ConnectClient(env["CONNECT_URL"]), env["ADMIN_DSN"], env)
    console.print(
        f"connector {result.connector} is RUNNING, capturing {len(result.tables)} table(s)"
    )
    written_at = time.monotonic()
    deleted_id = write_sample_rows(env["ADMIN_DSN"])
    console.print(f"wrote 3 inserts, 1 update, 1 delete (id {deleted_id}) into {DEMO_TABLE}")

    def saw_our_delete(events: list[ChangeEvent]) -> bool:
        # The tombstone that follows a delete is the last event of this burst.
        return any(e.is_tombstone and e.key == {"id": deleted_id} for e in events)

    topic = f"cdc.public.{DEMO_TABLE}"
    events = read_topic_until(
        env["KAFKA_BOOTSTRAP"], topic, EventDecoder(env["REGISTRY_URL"]), saw_our_delete
    )
    elapsed = time.monotonic() - written_at
    table = Table(
        "offset",
        "op",
        "key",
        "row (after, or before for deletes)",
        "lsn",
        "txId",
        "schema id",
        title=f"change events on {topic}",
    )
    for e in events[-12:]:
        row = e.after if e.after is not None else e.before
        table.add_row(
            str(e.offset),
            e.op or "tombstone",
            str(e.key),
            ""
            if row is None
            else ", ".join(f"{k}={v}" for k, v in row.items() if k != "updated_at"),
            str(e.source.get("lsn", "")),
            str(e.source.get("txId", "")),
            str(e.value_schema_id or ""),
        )
    Console().print(table)
    if not saw_our_delete(events):
        console.print("[red]the demo's change events did not arrive within 30 s[/red]")
        return 1
    console.print(
        f"[green]all of this run's events arrived[/green], {elapsed:.1f}s after the writes. "
        "Stop the stack with `projector stack down`."
    )
    return 0
