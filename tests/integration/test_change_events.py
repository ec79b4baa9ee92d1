"""Rows written to Postgres arrive on Kafka as decodable Debezium change events."""

from __future__ import annotations

import uuid
from decimal import Decimal

import httpx
import psycopg

from tests.integration.change_events import ChangeEvent
from tests.integration.conftest import StackHandle
from tests.integration.topic_reader import read_topic_until as read_until


def new_table(prefix: str) -> str:
    return f"it_{prefix}_{uuid.uuid4().hex[:8]}"


def topic_of(table: str) -> str:
    return f"cdc.public.{table}"


def ops(events: list[ChangeEvent]) -> list[str | None]:
    return [e.op for e in events]


def test_insert_update_delete_arrive_in_order_with_source_position(stack: StackHandle) -> None:
    table = new_table("crud")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, price numeric(10,2))")
    stack.apply()  # brings the new table into the publication
    stack.sql(f"INSERT INTO {table} VALUES (1, 'apple', 1.50)")
    stack.sql(f"UPDATE {table} SET name = 'pear', price = 2.25 WHERE id = 1")
    # The delete's own transaction id, read inside it: `txid_current() - 1` afterwards raced
    # with other transactions (Debezium's heartbeat upserts one every few seconds).
    with psycopg.connect(stack.admin_dsn) as conn, conn.transaction():
        conn.execute(f"DELETE FROM {table} WHERE id = 1")
        row = conn.execute("SELECT txid_current()").fetchone()
    assert row is not None
    (txid_of_delete,) = row

    events = read_until(
        stack.env["KAFKA_BOOTSTRAP"],
        topic_of(table),
        stack.decoder(),
        done=lambda evs: len(evs) >= 4,
    )

    assert ops(events) == ["c", "u", "d", None], ops(events)
    created, updated, deleted, tombstone = events
    assert created.before is None
    assert created.after == {"id": 1, "name": "apple", "price": Decimal("1.50")}
    assert updated.after == {"id": 1, "name": "pear", "price": Decimal("2.25")}
    assert deleted.after is None
    assert deleted.before is not None and deleted.before["id"] == 1
    assert tombstone.is_tombstone and tombstone.key == {"id": 1}
    assert all(e.key == {"id": 1} for e in events)
    lsns = [e.source["lsn"] for e in events[:3]]
    assert lsns == sorted(lsns) and len(set(lsns)) == 3, lsns
    tx_ids = [e.source["txId"] for e in events[:3]]
    assert len(set(tx_ids)) == 3, "three autocommit statements are three transactions"
    assert tx_ids[2] == txid_of_delete
    assert all(e.source["table"] == table and e.source["schema"] == "public" for e in events[:3])


def test_transaction_metadata_reports_begin_and_end_with_event_counts(stack: StackHandle) -> None:
    table = new_table("tx")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    stack.apply()
    tx_topic = "cdc.transaction"
    end = stack.end_offset(tx_topic)
    with psycopg.connect(stack.admin_dsn) as conn:
        conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
        (txid,) = conn.execute("SELECT txid_current()").fetchone()

    def ended(evs: list[ChangeEvent]) -> bool:
        return any(
            e.value and e.value["status"] == "END" and e.value["id"].startswith(f"{txid}:")
            for e in evs
        )

    events = read_until(
        stack.env["KAFKA_BOOTSTRAP"], tx_topic, stack.decoder(), done=ended, from_offset=end
    )
    mine = [e.value for e in events if e.value and e.value["id"].startswith(f"{txid}:")]
    assert [m["status"] for m in mine] == ["BEGIN", "END"]
    end = mine[1]
    assert end["event_count"] == 3
    counts = {c["data_collection"]: c["event_count"] for c in end["data_collections"]}
    assert counts == {f"public.{table}": 3}


def test_added_column_registers_a_second_schema_version(stack: StackHandle) -> None:
    table = new_table("ddl")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1, 'before alter')")
    stack.sql(f"ALTER TABLE {table} ADD COLUMN colour text DEFAULT 'red'")
    stack.sql(f"INSERT INTO {table} VALUES (2, 'after alter', 'blue')")

    events = read_until(
        stack.env["KAFKA_BOOTSTRAP"],
        topic_of(table),
        stack.decoder(),
        done=lambda evs: len(evs) >= 2,
    )

    first, second = events
    assert "colour" not in first.after
    assert second.after == {"id": 2, "name": "after alter", "colour": "blue"}
    assert first.value_schema_id != second.value_schema_id
    subject = f"{topic_of(table)}-value"
    versions = httpx.get(f"{stack.env['REGISTRY_URL']}/subjects/{subject}/versions").json()
    assert len(versions) == 2, versions


def test_rows_of_a_table_created_after_the_connector_are_snapshotted(stack: StackHandle) -> None:
    table = new_table("late")
    # Rows written before the table could be captured (a table created with its key joins the
    # publication by itself, and its rows stream: test_schema_changes.py)
    stack.sql(f"CREATE TABLE {table} (a int NOT NULL, b text NOT NULL)")
    stack.sql(f"INSERT INTO {table} VALUES (1, 'x'), (2, 'y'), (3, 'z')")
    stack.sql(f"ALTER TABLE {table} ADD PRIMARY KEY (a, b)")
    stack.apply()  # new table: publication + incremental snapshot

    events = read_until(
        stack.env["KAFKA_BOOTSTRAP"],
        topic_of(table),
        stack.decoder(),
        done=lambda evs: len(evs) >= 3,
    )

    assert ops(events) == ["r", "r", "r"]
    assert sorted((e.after["a"], e.after["b"]) for e in events if e.after) == [
        (1, "x"),
        (2, "y"),
        (3, "z"),
    ]
    assert all(e.key == {"a": e.after["a"], "b": e.after["b"]} for e in events if e.after)


def test_apply_is_idempotent(stack: StackHandle) -> None:
    from connectors import apply_connector

    result = apply_connector(stack.connect, stack.admin_dsn, stack.env)
    assert result.config_changed is False
    assert result.publication.added == () and result.publication.removed == ()
    assert result.snapshot_signal is None
