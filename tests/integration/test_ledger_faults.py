"""The transaction ledger under infrastructure faults and volume (projector/commit/ledger.py,
"Counted once" and "Pruning"), on the real stack:

- Kafka, Kafka Connect and the schema registry SIGKILLed in turn under a steady writer, then the
  projector: after each fault the read model's watermark moves on, and `run --until-caught-up`
  ends with the watermark at the writer's last transaction;
- a Connect restart makes Debezium send a window of events and ENDs again (Kafka holds them
  twice): each counts once, and nothing waits for the copies.

The ledger's rules with made-up ENDs and events (and the prune of a backlog larger than one
statement) are tested on an embedded ClickHouse in tests/unit/test_ledger.py; the running
projector's prune of 12,000 transactions in tests/integration/test_watermarks.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, TopicPartition

from projector.commit.transactions import parse_lsn
from tests.integration.conftest import PROJECTOR, StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.test_watermarks import read_model_over

WATERMARK_TIMEOUT_S = 240  # a restarted Connect resumes its task within a minute or two here


class Writer(threading.Thread):
    """An application writing small transactions (inserts, upserts, deletes on one keyed table)
    until stopped; `last_xid` is the newest transaction that changed a row."""

    def __init__(self, stack: StackHandle, table: str, pause_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.stack, self.table, self.pause_s = stack, table, pause_s
        self.stopped = threading.Event()
        self.last_xid: str | None = None
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(25)
        next_id = 1
        try:
            with psycopg.connect(self.stack.admin_dsn) as conn:
                while not self.stopped.is_set():
                    kind = rng.random()
                    if kind < 0.5 or next_id < 10:
                        statement, args = (
                            f"INSERT INTO {self.table} VALUES (%s, %s)",
                            [next_id, rng.randint(0, 1000)],
                        )
                        next_id += 1
                    elif kind < 0.85:
                        statement, args = (
                            f"INSERT INTO {self.table} VALUES (%s, %s) "
                            "ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n",
                            [rng.randrange(1, next_id), rng.randint(0, 1000)],
                        )
                    else:
                        statement, args = (
                            f"DELETE FROM {self.table} WHERE id = %s",
                            [rng.randrange(1, next_id)],
                        )
                    changed = conn.execute(statement, args).rowcount
                    (xid,) = conn.execute("SELECT txid_current() % (2^32)::bigint").fetchone()  # type: ignore[misc]
                    conn.commit()
                    if changed:
                        self.last_xid = str(xid)
                        self.transactions += 1
                    time.sleep(self.pause_s)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        self.join(60)
        assert self.error is None, f"the application failed to write: {self.error!r}"


def source_lsn(stack: StackHandle) -> int:
    ((lsn,),) = stack.sql("SELECT pg_current_wal_lsn()::text")
    return parse_lsn(lsn)


def read_model_watermark(projector: ProjectorProcess, model: str) -> dict | None:
    status = projector.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["read_models"][model]["watermark"]


def wait_for_watermark_past(projector: ProjectorProcess, model: str, lsn: int, after: str) -> None:
    deadline = time.monotonic() + WATERMARK_TIMEOUT_S
    while True:
        mark = read_model_watermark(projector, model)
        if mark is not None and parse_lsn(mark["lsn"]) >= lsn:
            return
        assert time.monotonic() < deadline, (
            f"after {after}, the watermark stayed at {mark} (wanted past LSN {lsn:X}); "
            f"{projector.stack.connector_health()}\n{projector.log.read_text()[-3000:]}"
        )
        time.sleep(2)


def kill_component(stack: StackHandle, name: str) -> None:
    """SIGKILL one service of the stack, then `projector stack up` (which starts what is down)."""
    (pid,) = [s.pid for s in stack.stack.status() if s.name == name]
    assert pid is not None, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _running(pid):
        assert time.monotonic() < deadline, f"{name} (pid {pid}) survived SIGKILL"
        time.sleep(0.1)
    up = subprocess.run([PROJECTOR, "stack", "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"projector stack up after killing {name}:\n{up.stderr}{up.stdout}"
    connector = stack.connect.connectors()[0]
    stack.connect.wait_running(connector)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of `stack up` stays a zombie until reaped; it runs no more.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def copies_in_kafka(stack: StackHandle, table: str) -> tuple[int, int]:
    """How many change events of `table` and ENDs touching it Kafka holds more than once (the
    same transaction and LSN at two offsets). Each event held twice must carry the same
    `data_collection_order` both times: that is what the ledger counts it by."""
    decoder = stack.decoder()
    orders: dict[tuple[str, int], set[int]] = defaultdict(set)
    seen: dict[tuple[str, int], int] = defaultdict(int)
    for message in stack.messages_to_end(f"cdc.public.{table}", timeout_s=120):
        if message.value() is None:
            continue
        value = decoder.decode_part(message.value())
        block = value.get("transaction")
        if not block:
            continue  # a snapshot read belongs to no transaction
        key = (str(block["id"]), int(value["source"]["lsn"]))
        seen[key] += 1
        orders[key].add(int(block["data_collection_order"]))
    moved = {key: found for key, found in orders.items() if len(found) > 1}
    assert not moved, f"events sent again with another data_collection_order: {moved}"
    ends: dict[str, int] = defaultdict(int)
    collection = f"public.{table}"
    for message in _transaction_topic(stack):
        value = decoder.decode_part(message)
        if value.get("status") == "END" and any(
            c["data_collection"] == collection for c in value.get("data_collections") or []
        ):
            ends[value["id"]] += 1
    return (sum(n - 1 for n in seen.values()), sum(n - 1 for n in ends.values()))


def _transaction_topic(stack: StackHandle) -> list[bytes]:
    """The values of the transaction topic from its end back, far enough for this test."""
    topic = "cdc.transaction"
    end = stack.end_offset(topic)
    start = max(0, end - 200_000)
    consumer = Consumer(
        {
            "bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"],
            "group.id": "ledger-fault-reader",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, start)])
    values: list[bytes] = []
    last = start - 1
    deadline = time.monotonic() + 120
    while last < end - 1:
        assert time.monotonic() < deadline, f"{topic} not read to {end - 1}"
        for message in consumer.consume(10_000, 1):
            if message.error():
                continue
            last = message.offset() or 0
            if message.value() is not None:
                values.append(message.value())
    consumer.close()
    return values


def watermark_deployment(
    stack: StackHandle, tmp_path: Path, prefix: str, server_url: str | None
) -> tuple[ProjectorProcess, str, str]:
    projector = ProjectorProcess(stack, tmp_path, server_url=server_url)
    table, model = projector.table(prefix), projector.table(f"{prefix}_model")
    projector.env |= {
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_READ_MODEL_SCHEMA": "public",
        "PROJECTOR_READ_MODELS_FILE": str(read_model_over(tmp_path, model, table)),
    }
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)")
    stack.apply()
    return projector, table, model


def catch_up_and_check(
    stack: StackHandle, projector: ProjectorProcess, table: str, model: str, writer: Writer
) -> None:
    """`run --until-caught-up` ends, the replica equals Postgres, and the watermark is the
    writer's last transaction; the ledger recorded each END once."""
    run = projector.cli("run", "--until-caught-up", timeout_s=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_replica_equals_source(stack, projector, table, ["id"])
    mark = read_model_watermark(projector, model)
    assert mark is not None and mark["tx_id"] == writer.last_xid, (mark, writer.last_xid)
    twice = projector.sql(
        f"SELECT tx_id, lsn, count() AS n FROM {projector.control_db}.transaction_ends FINAL "
        f"WHERE data_collection = 'public.{table}' GROUP BY tx_id, lsn HAVING n > 1"
    )
    assert twice == [], twice


@one_backend("server")  # read while the projector runs; the ledger's SQL is the same on chDB
def test_kafka_connect_and_the_registry_killed_under_a_writer(
    stack: StackHandle, tmp_path: Path, server_url: str | None
) -> None:
    projector, table, model = watermark_deployment(stack, tmp_path, "lf_fault", server_url)
    writer = Writer(stack, table)
    writer.start()
    process = projector.start()
    try:
        wait_for_watermark_past(projector, model, source_lsn(stack), "the start")
        for name in ("kafka", "connect", "registry"):
            kill_component(stack, name)
            wait_for_watermark_past(projector, model, source_lsn(stack), f"killing {name}")
        process.kill()  # the projector itself, mid-batch
        process.wait(30)
        process = projector.start()
        wait_for_watermark_past(projector, model, source_lsn(stack), "killing the projector")
    finally:
        writer.stop()
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    assert writer.transactions > 1000, writer.transactions
    catch_up_and_check(stack, projector, table, model, writer)
    copies_in_kafka(stack, table)  # whatever was sent twice kept its place in its transaction


@one_backend("chdb")
def test_a_window_connect_sends_again_counts_once(
    stack: StackHandle, tmp_path: Path, server_url: str | None
) -> None:
    """Connect SIGKILLed while Debezium streams a burst: what it sent since its last flushed
    offset (a second at most here) it sends again after the restart."""
    projector, table, model = watermark_deployment(stack, tmp_path, "lf_resend", server_url)
    topic = f"cdc.public.{table}"
    writer = Writer(stack, table, pause_s=0.0)
    copies = (0, 0)
    try:
        for _attempt in range(3):  # a kill right at a flush re-sends nothing: try again
            if not writer.is_alive():
                writer.start()
            deadline = time.monotonic() + 120
            while _end_offset_or_zero(stack, topic) < 300 * (_attempt + 1):
                assert time.monotonic() < deadline, stack.connector_health()
                time.sleep(0.2)
            kill_component(stack, "connect")
            copies = copies_in_kafka(stack, table)
            if copies[0] and copies[1]:
                break
    finally:
        writer.stop()
    events_twice, ends_twice = copies
    assert events_twice > 0 and ends_twice > 0, copies  # the window was sent again
    catch_up_and_check(stack, projector, table, model, writer)


def _end_offset_or_zero(stack: StackHandle, topic: str) -> int:
    try:
        return stack.end_offset(topic)
    except Exception:  # the topic appears with its first event
        return 0
