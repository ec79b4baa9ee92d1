"""A Debezium re-snapshot leaves no ghost rows (issue 10, item 5; projector/replicas/snapshot_sweep.py).

Capture stops and its replication slot is lost; meanwhile the application deletes and updates
rows. Debezium then snapshots the table again (here: its offsets reset, so the `initial` snapshot
mode snapshots anew), and the deleted keys get no delete event. The replica must still equal
Postgres afterwards — twice, once per apply path, with each snapshot spread over several batches.

The test runs a connector of its own (own slot, publication and topic prefix) over its table and
the harness's fence table, so losing the slot touches no other test's capture.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from connectors.config import render_connector
from devstack.shop import ShopWriter, create_shop
from tests.integration.conftest import FENCE_TABLE, StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.read_model_checks import assert_equal_to_postgres, assert_reconciled


class OwnCapture:
    """A Debezium connector of one test over `tables` (`schema.table`): its own slot,
    publication and topic prefix."""

    def __init__(self, stack: StackHandle, unique: str, tables: list[str]) -> None:
        self.stack, self.tables = stack, tables
        self.name, self.slot = f"ghosts-{unique}", f"ghosts_{unique}"
        self.prefix = f"ghosts{unique}"
        stack.sql(f"CREATE PUBLICATION {self.slot} FOR TABLE {', '.join(tables)}")
        definition = render_connector(
            {
                **stack.env,
                "CONNECTOR_NAME": self.name,
                "SLOT_NAME": self.slot,
                "PUBLICATION_NAME": self.slot,
                "TOPIC_PREFIX": self.prefix,
                "TABLE_INCLUDE_LIST": ",".join(tables),
            }
        )
        self.config = definition["config"]
        for shared in ("signal.data.collection", "signal.enabled.channels"):
            self.config.pop(shared)  # the signal table is the shared connector's

    def start(self) -> None:
        self.stack.connect.put_config(self.name, self.config)
        self.stack.connect.wait_running(self.name)

    def lose_slot_and_offsets(self) -> None:
        """Stop capture, drop its replication slot, and reset the connector's offsets: on resume
        Debezium remembers nothing and snapshots its tables again."""
        self.stack.connect.stop(self.name)
        self.stack.connect.wait_state(self.name, "STOPPED")
        self.drop_slot()
        reset = httpx.delete(f"{self.stack.env['CONNECT_URL']}/connectors/{self.name}/offsets")
        assert reset.status_code == 200, reset.text

    def resume_until_snapshotted(self) -> None:
        """Resume capture, and wait until the new snapshot's reads of every table are in Kafka
        (one per row)."""
        expected = {}
        for table in self.tables:
            ((rows,),) = self.stack.sql(f"SELECT count(*) FROM {table}")
            topic = f"{self.prefix}.{table}"
            expected[topic] = self.stack.end_offset(topic) + rows
        self.stack.connect.resume(self.name)
        self.stack.connect.wait_running(self.name)
        deadline = time.monotonic() + 120
        for topic, end in expected.items():
            while self.stack.end_offset(topic) < end:
                assert time.monotonic() < deadline, f"Debezium did not snapshot {topic} again"
                time.sleep(0.3)

    def drop_slot(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            slots = self.stack.sql(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", [self.slot]
            )
            if not slots:
                return
            if not slots[0][0]:
                self.stack.sql("SELECT pg_drop_replication_slot(%s)", [self.slot])
                return
            assert time.monotonic() < deadline, f"slot {self.slot} stayed active"
            time.sleep(0.3)

    def remove(self) -> None:
        self.stack.connect.delete(self.name)
        self.drop_slot()
        self.stack.sql(f"DROP PUBLICATION IF EXISTS {self.slot}")


@pytest.fixture
def capture(stack: StackHandle, tmp_path: Path) -> Iterator[tuple[OwnCapture, ProjectorProcess]]:
    projector = ProjectorProcess(stack, tmp_path)
    table = projector.table("ghosts")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.sql(f"INSERT INTO {table} SELECT i, 'initial' FROM generate_series(1, 40) AS i")
    own = OwnCapture(stack, projector.unique, [f"public.{table}", f"public.{FENCE_TABLE}"])
    projector.env |= {
        "PROJECTOR_TOPIC_PREFIX": own.prefix,
        # The snapshot spans several batches: its first read and its last are in different ones.
        "PROJECTOR_MAX_BATCH_MESSAGES": "7",
    }
    try:
        own.start()
        yield own, projector
    finally:
        own.remove()


def test_keys_deleted_while_capture_was_lost_are_gone_after_each_re_snapshot(
    stack: StackHandle, capture: tuple[OwnCapture, ProjectorProcess]
) -> None:
    own, projector = capture
    table = projector.table("ghosts")
    stack.sql(f"UPDATE {table} SET v = 'streamed' WHERE id <= 5")
    projector.catch_up()
    assert_replica_equals_source(stack, projector, table, ["id"])

    # Twice, once per apply path; the second snapshot's bounds follow the first one's.
    rounds = [
        ("fast path", "true", "id BETWEEN 11 AND 20 OR id = 3", 11, range(41, 46)),
        ("per-message path", "false", "id BETWEEN 26 AND 30 OR id = 11", 26, range(46, 48)),
    ]
    for path, fast_path, deleted, comes_back, inserted in rounds:
        projector.env["PROJECTOR_FAST_PATH"] = fast_path
        own.lose_slot_and_offsets()
        # Not captured: no event will ever say these keys were deleted.
        stack.sql(f"DELETE FROM {table} WHERE {deleted}")
        stack.sql(f"UPDATE {table} SET v = 'while lost ({path})' WHERE id BETWEEN 21 AND 25")
        stack.sql(
            f"INSERT INTO {table} SELECT i, 'while lost' FROM generate_series(%s::int, %s::int) AS i",
            [inserted.start, inserted.stop - 1],
        )
        own.resume_until_snapshotted()
        # A ghost's key comes back after the snapshot: streamed above its deletion marker.
        stack.sql(f"INSERT INTO {table} VALUES (%s, %s)", [comes_back, f"back ({path})"])
        projector.catch_up()

        assert_replica_equals_source(stack, projector, table, ["id"])
        back = projector.sql(
            f"SELECT v FROM {projector.replica_db}.{table} FINAL WHERE id = {comes_back}"
        )
        assert back == [{"v": f"back ({path})"}], (path, back)


def test_read_models_lose_the_ghosts_of_a_re_snapshot(stack: StackHandle, tmp_path: Path) -> None:
    """The sweep's markers are rows of their batch: the read models' maintainer recomputes the
    ghosts' keys in the same batch (projector/read_models/maintenance.py reads a batch's rows by offset)."""
    projector = ProjectorProcess(stack, tmp_path)
    schema = f"shop_{projector.unique}"
    create_shop(stack.admin_dsn, schema)
    cdc = stack.env["CDC_USER"]
    stack.sql(f"GRANT USAGE ON SCHEMA {schema} TO {cdc}")
    stack.sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {cdc}")
    ShopWriter(stack.admin_dsn, schema, seed=3).run(rate_per_s=0, transactions=120)
    shop = ["customers", "products", "orders", "order_items"]
    own = OwnCapture(
        stack, projector.unique, [f"{schema}.{t}" for t in shop] + [f"public.{FENCE_TABLE}"]
    )
    projector.env |= {
        "PROJECTOR_TOPIC_PREFIX": own.prefix,
        "PROJECTOR_SCHEMAS": f"public,{schema}",
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|{'|'.join(shop)})",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
    }
    try:
        own.start()
        projector.catch_up()

        own.lose_slot_and_offsets()
        # Unseen: a third of the orders go (their lines with them, ON DELETE CASCADE), and
        # others are cancelled.
        stack.sql(f"DELETE FROM {schema}.orders WHERE id % 3 = 0")
        stack.sql(f"UPDATE {schema}.orders SET status = 'CANCELLED' WHERE id % 3 = 1")
        own.resume_until_snapshotted()
        projector.catch_up()

        # An entity per table (order lines have a two-column key) and two aggregates against
        # Postgres (each model is a process start: the rest are covered by the reconciliation).
        others = {"order_status", "monthly_sales", "customer_lifetime_value", "product_popularity"}
        assert_equal_to_postgres(stack, projector, schema, skip=frozenset(others))
        assert_reconciled(projector)
    finally:
        own.remove()
