"""`projector rebuild SCHEMA.TABLE` from a Debezium incremental snapshot, when Kafka's retention
no longer holds the table's history: chosen by itself, applied by the running projector while
rows are updated, deleted and inserted, resumed after a SIGKILL mid-snapshot without asking
Debezium twice, verified against Postgres and swapped in; the rebuilt table equals Postgres,
with no row of a key deleted before and without the ghost the live table had.

Server backend only: the live table must move for the snapshot's reads to arrive, so the job
runs in `projector run` beside the command (with chDB the command records it for the next run).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time

import httpx
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.test_rebuild import start, stop

ROWS = 20_000  # ten of Debezium's chunks (incremental.snapshot.chunk.size 2048)
GHOST = 999_999_999  # a key Postgres never had, written into the live table by hand


@pytest.fixture
def server_url(clickhouse_server: str) -> str:
    """The command runs beside a running projector: the server backend only."""
    return clickhouse_server


def scans_completed(stack: StackHandle, table: str, since: int) -> list[dict[str, object]]:
    """Debezium's TABLE_SCAN_COMPLETED notifications for `table` from offset `since` on."""
    decoder = stack.decoder()
    found = []
    for message in stack.messages_to_end(f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.notifications"):
        if (message.offset() or 0) < since or not message.value():
            continue
        note = decoder.decode_part(message.value())
        data = note.get("additional_data") or {}
        if note["type"] == "TABLE_SCAN_COMPLETED" and data.get("scanned_collection") == table:
            found.append(note)
    return found


def snapshot_reads(stack: StackHandle, topic: str, since: int = 0) -> list[tuple[int, dict]]:
    """The snapshot reads (`op = r`) in `topic[0]` from offset `since` (or its earliest) on:
    (offset, decoded value) each."""
    end = stack.end_offset(topic)
    consumer = Consumer(
        {
            "bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"],
            "group.id": "probe",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, since or OFFSET_BEGINNING)])
    decoder, reads, offset = stack.decoder(), [], since - 1
    deadline = time.monotonic() + 60
    while offset < end - 1:
        assert time.monotonic() < deadline, f"{topic} not read to {end - 1}"
        for message in consumer.consume(5000, 1.0):
            if message.error():
                continue
            offset = message.offset() or 0
            value = message.value()
            decoded = decoder.decode_part(value) if value else None
            if decoded is not None and decoded["op"] == "r":
                reads.append((offset, decoded))
    consumer.close()
    return reads


def last_read(stack: StackHandle, topic: str) -> int:
    """The offset of the last incremental snapshot read in `topic[0]` (-1: none)."""
    return max(
        (
            o
            for o, read in snapshot_reads(stack, topic)
            if read["source"]["snapshot"] == "incremental"
        ),
        default=-1,
    )


def test_a_replica_table_past_retention_is_rebuilt_from_a_snapshot_and_resumes_after_a_kill(
    stack: StackHandle,
    projector: ProjectorProcess,
    server_url: str,
    started: list[subprocess.Popen[bytes]],
) -> None:
    table = projector.table("stock")
    stack.sql(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, qty int NOT NULL)")
    stack.sql(f"INSERT INTO {table} (qty) SELECT n FROM generate_series(1, {ROWS}) n")
    stack.sql(f"UPDATE {table} SET qty = qty + 1000 WHERE id % 7 = 0")
    stack.sql(f"DELETE FROM {table} WHERE id % 10 = 0")  # deleted before the rebuild
    projector.env["PROJECTOR_REPLICA_REBUILD_CHUNK_MESSAGES"] = "500"
    projector.catch_up()
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.public.{table}"
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    retained = stack.end_offset(topic) - 5  # retention removed all but the last few events
    for future in admin.delete_records([TopicPartition(topic, 0, retained)]).values():
        future.result(timeout=30)
    # The live table is wrong: a row of a key Postgres never had (what a rebuild is for).
    live = f"{projector.replica_db}.{table}"
    httpx.post(
        server_url,
        content=f"INSERT INTO {live} (id, qty, _version) VALUES ({GHOST}, 1, 1)",
        timeout=30,
    ).raise_for_status()

    process, since = start(projector, started)
    writing = threading.Event()

    def write() -> None:  # updates, deletes and inserts throughout the rebuild
        rng = random.Random(3)
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            while not writing.is_set():
                key = rng.randrange(1, ROWS)
                conn.execute(f"UPDATE {table} SET qty = qty + 1 WHERE id = %s", [key])
                conn.execute(f"DELETE FROM {table} WHERE id = %s", [rng.randrange(1, ROWS)])
                conn.execute(f"INSERT INTO {table} (qty) VALUES (7)")
                time.sleep(0.02)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    seen = len(projector.log.read_bytes())
    rebuild_log = projector.log.parent / "rebuild.log"
    with rebuild_log.open("wb") as out:
        rebuild = subprocess.Popen(  # no --from: Kafka lacks the history, a snapshot is chosen
            [PROJECTOR, "rebuild", f"public.{table}"],
            env=projector.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started.append(rebuild)
    deadline = time.monotonic() + 120
    asked = f"rebuilding public.{table} from a Debezium snapshot".encode()
    while asked not in projector.log.read_bytes()[seen:]:
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the snapshot asked for, the shadow not yet swapped
    process.wait(30)
    (job,) = projector.sql(
        f"SELECT id, state, snapshot FROM {projector.control_db}.replica_rebuilds FINAL"
    )
    assert job["state"] in ("snapshotting", "catching-up"), job
    process, since = start(projector, started)
    assert rebuild.wait(300) == 0, rebuild_log.read_text() + projector.log.read_text()[-3000:]
    report = rebuild_log.read_text()
    assert "from a Debezium snapshot" in report and "swapped" in report, report
    assert "differed from the live table" in report, report  # the ghost: live had one row more

    writing.set()
    writer.join(30)
    stop(projector, process, since)
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) > ROWS * 0.8
    assert (
        projector.sql(
            f"SELECT id FROM {live} WHERE id = {GHOST} OR id % 10 = 0 AND id <= "
            f"{ROWS} AND NOT _is_deleted"
        )
        == []
    )
    # The request survived the kill once: Debezium scanned the table once since it was asked.
    notes_from = int(json.loads(job["snapshot"])["notifications_from"])
    assert len(scans_completed(stack, f"public.{table}", notes_from)) == 1
    # The end the shadow had to reach (S4, read when the scan was reported complete) is past
    # every read of the snapshot: the notification came after the reads.
    (done,) = projector.sql(f"SELECT snapshot FROM {projector.control_db}.replica_rebuilds FINAL")
    assert last_read(stack, topic) < int(json.loads(done["snapshot"])["end"]["0"])
