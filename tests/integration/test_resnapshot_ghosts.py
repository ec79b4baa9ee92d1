"""A Debezium re-snapshot leaves no ghost rows (issue 10, item 5; projector/snapshot_sweep.py).

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
from tests.integration.conftest import FENCE_TABLE, StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source


class OwnCapture:
    """A Debezium connector of one test: its own slot, publication and topic prefix."""

    def __init__(self, stack: StackHandle, unique: str, tables: list[str]) -> None:
        self.stack = stack
        self.name, self.slot = f"ghosts-{unique}", f"ghosts_{unique}"
        self.prefix = f"ghosts{unique}"
        listed = ", ".join(f"public.{t}" for t in tables)
        stack.sql(f"CREATE PUBLICATION {self.slot} FOR TABLE {listed}")
        definition = render_connector({
            **stack.env, "CONNECTOR_NAME": self.name, "SLOT_NAME": self.slot,
            "PUBLICATION_NAME": self.slot, "TOPIC_PREFIX": self.prefix,
            "TABLE_INCLUDE_LIST": ",".join(f"public.{t}" for t in tables),
        })  # fmt: skip
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

    def resume(self) -> None:
        self.stack.connect.resume(self.name)
        self.stack.connect.wait_running(self.name)

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
    own = OwnCapture(stack, projector.unique, [table, FENCE_TABLE])
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
    topic = f"{own.prefix}.public.{table}"
    stack.sql(f"UPDATE {table} SET v = 'streamed' WHERE id <= 5")
    projector.catch_up()
    assert_replica_equals_source(stack, projector, table, ["id"])

    # Twice, once per apply path; the second snapshot's bounds follow the first one's.
    rounds = [("fast path", "true", "id BETWEEN 11 AND 20 OR id = 3", 11, range(41, 46)),
              ("per-message path", "false", "id BETWEEN 26 AND 30 OR id = 11", 26, range(46, 48))]  # fmt: skip
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
        before = stack.end_offset(topic)
        ((live,),) = stack.sql(f"SELECT count(*) FROM {table}")
        own.resume()
        deadline = time.monotonic() + 60
        while stack.end_offset(topic) < before + live:  # the snapshot's reads are all in Kafka
            assert time.monotonic() < deadline, "Debezium did not snapshot the table again"
            time.sleep(0.3)
        # A ghost's key comes back after the snapshot: streamed above its deletion marker.
        stack.sql(f"INSERT INTO {table} VALUES (%s, %s)", [comes_back, f"back ({path})"])
        projector.catch_up()

        assert_replica_equals_source(stack, projector, table, ["id"])
        back = projector.sql(
            f"SELECT v FROM {projector.replica_db}.{table} FINAL WHERE id = {comes_back}"
        )
        assert back == [{"v": f"back ({path})"}], (path, back)
