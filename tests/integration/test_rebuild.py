"""`projector rebuild` builds a read model's family again beside the serving one while the
running projector keeps serving and updating it; a reader polling it throughout never sees an
empty, failed or going-backwards answer; a SIGKILL of the projector mid-rebuild resumes; a
rollback serves the replaced version again. `projector pause | resume` hold a table back.

Server backend only: the command runs beside the projector (with chDB one process owns the
data, and the command does the job itself: the same code, without the concurrency).

The size: PROJECTOR_REBUILD_TEST_ORDERS orders (about 3.5 events each) before the read model's
rebuild; PROJECTOR_REBUILD_TEST_EVENTS events (1,000,000; the topic's offsets must show them)
before the replica table's rebuild from Kafka, which prints how long each phase took (most of it
is Debezium streaming the load). docs/benchmarks.md has the large read-model run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from devstack.shop import ShopWriter
from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.read_model_checks import assert_equal_to_postgres, shop_projection

ORDERS = int(os.environ.get("PROJECTOR_REBUILD_TEST_ORDERS", "3000"))
EVENTS = int(os.environ.get("PROJECTOR_REBUILD_TEST_EVENTS", "1000000"))
INSERT_ROWS = 100_000  # rows per source transaction while loading EVENTS
READERS = 2  # polling the replica table while it is rebuilt


class Phases:
    """How long each phase of a test took, printed at its end (pytest -s shows it)."""

    def __init__(self) -> None:
        self.began = self.last = time.monotonic()
        self.times: list[tuple[str, float]] = []

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.times.append((phase, now - self.last))
        self.last = now

    def __str__(self) -> str:
        shown = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.times)
        return f"{shown}; total {self.last - self.began:.1f} s"


def topic_messages(stack: StackHandle, topic: str) -> int:
    """The messages `topic` holds now (over its partitions, end minus earliest offset)."""
    consumer = Consumer({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"], "group.id": "probe"})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return 0
        marks = [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in metadata.partitions
        ]
        return sum(end - low for low, end in marks)
    finally:
        consumer.close()


def wait_for_messages(stack: StackHandle, topic: str, count: int, timeout_s: float) -> None:
    """Until `topic` holds `count` messages (Debezium has streamed a load)."""
    deadline = time.monotonic() + timeout_s
    while (held := topic_messages(stack, topic)) < count:
        assert time.monotonic() < deadline, (
            f"{topic} holds {held} of {count} messages after {timeout_s}s; "
            f"{stack.connector_health()}"
        )
        time.sleep(0.5)


def wait_for_rows(projector: ProjectorProcess, table: str, count: int, timeout_s: float) -> None:
    """Until the replica `table` (DATABASE.TABLE) holds `count` rows."""
    exists = (
        f"SELECT count() AS n FROM system.tables WHERE database = '{table.split('.')[0]}' "
        f"AND name = '{table.split('.')[1]}'"
    )
    deadline = time.monotonic() + timeout_s
    held = 0
    while True:
        if int(projector.sql(exists)[0]["n"]):
            held = int(projector.sql(f"SELECT count() AS n FROM {table} FINAL")[0]["n"])
            if held >= count:
                return
        assert time.monotonic() < deadline, (
            f"{table} holds {held} of {count} rows after {timeout_s}s: "
            f"{projector.log.read_text()[-3000:]}"
        )
        time.sleep(0.5)


def table_uuid(projector: ProjectorProcess, table: str) -> str:
    """The UUID of the table named `table` (DATABASE.TABLE) now: `EXCHANGE TABLES` swaps names,
    each table keeps its UUID, so it tells which table serves under the name."""
    database, name = table.split(".")
    (row,) = projector.sql(
        f"SELECT toString(uuid) AS uuid FROM system.tables "
        f"WHERE database = '{database}' AND name = '{name}'"
    )
    return str(row["uuid"])


def verified(projector: ProjectorProcess, table: str) -> int:
    """`projector verify TABLE`: equal to Postgres, every row and column; the rows compared."""
    verified = projector.cli("verify", "--json", table, timeout_s=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    (result,) = json.loads(verified.stdout)["results"]
    assert result["equal"] and result["postgres_rows"] == result["clickhouse_rows"], result
    return int(result["postgres_rows"])


@pytest.fixture
def server_url(clickhouse_server: str) -> str:
    """These tests run the command beside a running projector: the server backend only."""
    return clickhouse_server


def start(
    projector: ProjectorProcess, started: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], int]:
    """`projector run` in the background; the process and where its log began."""
    projector.log.touch()
    since = len(projector.log.read_bytes())
    process = projector.start()
    started.append(process)
    return process, since


def stop(projector: ProjectorProcess, process: subprocess.Popen[bytes], since: int) -> None:
    """SIGTERM once it runs (it has taken its partitions): it finishes its batch and exits 0."""
    deadline = time.monotonic() + 120
    while b"assigned" not in projector.log.read_bytes()[since:]:
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


class NewOrdersOnly(ShopWriter):
    """Inserts orders with their lines and nothing else: the number of orders and the sum of
    their totals only grow, so a reader may expect both never to go back."""

    def _one_transaction(self, conn: psycopg.Connection) -> None:
        self._new_order(conn)


@dataclass
class Reader:
    """Polls count() and sum(total) of a read model every few milliseconds, recording every
    answer that is empty, failed, or smaller than one before it."""

    url: str
    query: str  # one row: n (a count) and s (a sum)
    pause_s: float = 0.005  # between an answer and the next question
    stop: threading.Event = field(default_factory=threading.Event)
    answers: int = 0
    last: tuple[int, float] = (0, 0.0)
    wrong: list[str] = field(default_factory=list)

    def run(self) -> None:
        query = f"{self.query} FORMAT JSON"
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                response = client.post(self.url, content=query)
                if response.status_code != 200:
                    self.wrong.append(f"failed: {response.text[:300]}")
                else:
                    row = json.loads(response.text)["data"][0]
                    now = (int(row["n"]), float(row["s"]))
                    if now[0] == 0:
                        self.wrong.append("empty")
                    elif now[0] < self.last[0] or now[1] < self.last[1] - 1e-6:
                        self.wrong.append(f"went back from {self.last} to {now}")
                    self.last = max(self.last, now)
                    self.answers += 1
                time.sleep(self.pause_s)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread


def versions(projector: ProjectorProcess, family: str) -> list[dict[str, object]]:
    listed = projector.cli("read-models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [row for row in json.loads(listed.stdout) if row["family"] == family]


def test_a_read_model_rebuild_serves_throughout_resumes_after_a_kill_and_rolls_back(
    stack: StackHandle,
    projector: ProjectorProcess,
    server_url: str,
    started: list[subprocess.Popen[bytes]],
) -> None:
    schema = shop_projection(stack, projector)
    NewOrdersOnly(stack.admin_dsn, schema, seed=5).run(rate_per_s=0, transactions=ORDERS)
    projector.catch_up()
    (old,) = versions(projector, "order_summary")
    assert old["state"] == "serving", old
    # The rebuild in about 6 chunks (the first versions above were built in one): each chunk,
    # and each chunk's verification, waits a round of the running projector's batches, so a
    # few chunks keep it short while the kill below still lands between two of them.
    projector.env["PROJECTOR_READ_MODEL_BACKFILL_CHUNK_KEYS"] = str(max(1, ORDERS // 5))

    process, since = start(projector, started)
    writing = threading.Event()
    writer = threading.Thread(
        target=NewOrdersOnly(stack.admin_dsn, schema, seed=6).run,
        kwargs={"rate_per_s": 50, "stop": writing.is_set},
        daemon=True,
    )
    reader = Reader(
        server_url,
        f"SELECT count() AS n, toFloat64(sum(total)) AS s FROM {projector.read_model_db}.order_summary",
    )
    threads = [writer, reader.start()]
    writer.start()
    seen = len(projector.log.read_bytes())
    with (projector.log.parent / "rebuild.log").open("wb") as out:
        rebuild = subprocess.Popen(  # follows the request across the projector's crash
            [PROJECTOR, "rebuild", "order_summary"],
            env=projector.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started.append(rebuild)
    deadline = time.monotonic() + 240
    while not re.search(
        rb"order_summary version \w+r\w+: [2-9]/", projector.log.read_bytes()[seen:]
    ):
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in the middle of the rebuild's backfill
    process.wait(30)
    assert sorted(str(v["state"]) for v in versions(projector, "order_summary")) == [
        "building",
        "serving",
    ]
    process, since = start(projector, started)
    assert rebuild.wait(300) == 0, (projector.log.parent / "rebuild.log").read_text()
    report = (projector.log.parent / "rebuild.log").read_text()
    assert "serving" in report and "--rollback" in report, report

    writing.set()
    writer.join(60)
    (new,) = [v for v in versions(projector, "order_summary") if v["state"] == "serving"]
    assert new["version"] != old["version"]
    assert [
        v["state"] for v in versions(projector, "order_summary") if v["version"] == old["version"]
    ] == ["previous"]
    reader.stop.set()
    threads[1].join(30)
    assert reader.wrong == [], reader.wrong[:5]
    assert reader.answers > 20, reader.answers  # it read throughout
    stop(projector, process, since)
    projector.catch_up()
    assert_equal_to_postgres(stack, projector, schema)

    # Rollback: the replaced version (kept current by every batch) serves again, exactly.
    process, since = start(projector, started)
    NewOrdersOnly(stack.admin_dsn, schema, seed=7).run(rate_per_s=0, transactions=50)
    rollback = projector.cli("rebuild", "order_summary", "--rollback", timeout_s=120)
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    states = {v["version"]: v["state"] for v in versions(projector, "order_summary")}
    assert states == {old["version"]: "serving", new["version"]: "previous"}, states
    drop = projector.cli("rebuild", "order_summary", "--drop-old", timeout_s=120)
    assert drop.returncode == 0, drop.stdout + drop.stderr
    stop(projector, process, since)
    projector.catch_up()
    assert [v["state"] for v in versions(projector, "order_summary")] == ["serving"]
    leftovers = projector.sql(
        f"SELECT name FROM system.tables WHERE database = '{projector.read_model_db}' "
        f"AND endsWith(name, '__{new['version']}')"
    )
    assert leftovers == [], leftovers
    assert_equal_to_postgres(stack, projector, schema)


def test_a_paused_table_holds_until_resumed(
    stack: StackHandle, projector: ProjectorProcess, started: list[subprocess.Popen[bytes]]
) -> None:
    schema = shop_projection(stack, projector)
    NewOrdersOnly(stack.admin_dsn, schema, seed=8).run(rate_per_s=0, transactions=20)
    projector.catch_up()
    orders = f"{projector.replica_db.replace('public', schema)}.orders"
    (before,) = projector.sql(f"SELECT count() AS n FROM {orders} FINAL")
    process, since = start(projector, started)
    paused = projector.cli("pause", f"{schema}.orders", "--yes")
    assert paused.returncode == 0, paused.stderr
    deadline = time.monotonic() + 60
    while not projector.sql(
        f"SELECT table FROM {projector.control_db}.table_pause_states FINAL WHERE paused = 1"
    ):
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.3)

    NewOrdersOnly(stack.admin_dsn, schema, seed=9).run(rate_per_s=0, transactions=20)
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.{schema}.orders"
    end = stack.end_offset(topic)
    fence = stack.fence()  # committed after the orders: applied once the projector got past them
    deadline = time.monotonic() + 120
    while not projector.fence_applied(fence):
        assert time.monotonic() < deadline, (
            f"{stack.connector_health()}\n{projector.log.read_text()[-3000:]}"
        )
        time.sleep(0.3)
    assert stack.end_offset(topic) >= end > 0
    (held,) = projector.sql(f"SELECT count() AS n FROM {orders} FINAL")
    assert held == before, "a paused table was applied"
    # the order lines (not paused) went on
    (lines,) = projector.sql(
        f"SELECT count() AS n FROM {orders.replace('.orders', '.order_items')} FINAL"
    )
    ((pg_lines,),) = stack.sql(f"SELECT count(*) FROM {schema}.order_items")
    assert int(lines["n"]) == pg_lines

    resumed = projector.cli("resume", f"{schema}.orders", "--yes")
    assert resumed.returncode == 0, resumed.stderr
    stop(projector, process, since)
    projector.catch_up()
    (after,) = projector.sql(f"SELECT count() AS n FROM {orders} FINAL")
    ((pg_orders,),) = stack.sql(f"SELECT count(*) FROM {schema}.orders")
    assert int(after["n"]) == pg_orders > int(before["n"])
    assert_equal_to_postgres(stack, projector, schema)


def test_a_replica_table_rebuilt_from_kafka_serves_throughout_resumes_and_rolls_back(
    stack: StackHandle,
    projector: ProjectorProcess,
    server_url: str,
    started: list[subprocess.Popen[bytes]],
) -> None:
    """EVENTS (1M) events in the table's topic, the whole of it rebuilt in chunks of a tenth."""
    phases = Phases()
    table = projector.table("ledger")
    topic = f"cdc.public.{table}"
    live = f"{projector.replica_db}.{table}"
    stack.sql(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, amount int NOT NULL)")
    projector.env["PROJECTOR_MAX_BATCH_MESSAGES"] = "50000"  # the load in big batches
    projector.env["PROJECTOR_REPLICA_REBUILD_CHUNK_MESSAGES"] = str(max(1, EVENTS // 10))
    # The projector applies the load while Debezium streams it (Debezium is the slower one).
    process, since = start(projector, started)
    for first in range(0, EVENTS, INSERT_ROWS):
        stack.sql(
            f"INSERT INTO {table} (amount) SELECT n % 100 "
            f"FROM generate_series({first + 1}, {min(EVENTS, first + INSERT_ROWS)}) n"
        )
    phases.done("insert")
    wait_for_messages(stack, topic, EVENTS, timeout_s=400)
    assert topic_messages(stack, topic) >= EVENTS
    phases.done("in Kafka")
    wait_for_rows(projector, live, EVENTS, timeout_s=300)  # only inserts so far: all applied
    stop(projector, process, since)
    applied = re.search(
        rb"(\d+) events applied \((\d+) by the fast path\)", projector.log.read_bytes()[since:]
    )
    assert applied and int(applied[1]) == int(applied[2]) >= EVENTS, applied
    phases.done("applied")
    loaded = table_uuid(projector, live)
    process, since = start(projector, started)

    writing = threading.Event()

    def insert_only() -> None:  # rows only come: count and sum may never go back
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            while not writing.is_set():
                conn.execute(f"INSERT INTO {table} (amount) VALUES (7), (8)")
                time.sleep(0.02)

    writer = threading.Thread(target=insert_only, daemon=True)
    writer.start()
    # Readers asking without pause: while one reads, another waits for the server, ready to run
    # between any two statements of the swap (a swap in two steps would show it the table missing).
    query = (
        f"SELECT count() AS n, toFloat64(sum(amount)) AS s FROM {live} FINAL WHERE NOT _is_deleted"
    )
    readers = [Reader(server_url, query, pause_s=0) for _ in range(READERS)]
    reading = [reader.start() for reader in readers]
    seen = len(projector.log.read_bytes())
    with (projector.log.parent / "rebuild.log").open("wb") as out:
        rebuild = subprocess.Popen(
            [PROJECTOR, "rebuild", f"public.{table}", "--from", "kafka"],
            env=projector.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started.append(rebuild)
    chunk = re.compile(rf"rebuilding public\.{table}: \S+\[\d+\] (\d+)-".encode())
    deadline = time.monotonic() + 240
    while len(chunk.findall(projector.log.read_bytes()[seen:])) < 3:
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in the middle of the rebuild: its third chunk
    process.wait(30)
    assert b"swapped in" not in projector.log.read_bytes()[seen:]
    phases.done("rebuild until the kill")
    seen = len(projector.log.read_bytes())
    process, since = start(projector, started)
    assert rebuild.wait(300) == 0, (projector.log.parent / "rebuild.log").read_text()
    report = (projector.log.parent / "rebuild.log").read_text()
    assert "swapped" in report, report
    resumed_at = int(chunk.findall(projector.log.read_bytes()[seen:])[0])
    assert resumed_at > 0, "the rebuild began again instead of resuming"
    assert table_uuid(projector, live) != loaded  # the rebuilt table serves
    phases.done("rebuild after the kill")

    writing.set()
    writer.join(30)
    for reader, thread in zip(readers, reading, strict=True):
        reader.stop.set()
        thread.join(30)
    for reader in readers:
        assert reader.wrong == [], reader.wrong[:5]
        assert reader.answers > 20, reader.answers  # it read throughout
        assert reader.last[0] > EVENTS, reader.last  # and read the whole table
    stop(projector, process, since)
    projector.catch_up()
    assert verified(projector, f"public.{table}") > EVENTS
    phases.done("verified")

    # Rollback: the previous table, chased meanwhile, serves again and equals Postgres.
    process, since = start(projector, started)
    stack.sql(f"INSERT INTO {table} (amount) VALUES (1), (2), (3)")
    rollback = projector.cli("rebuild", f"public.{table}", "--rollback", timeout_s=120)
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert "previous table serving" in rollback.stdout + rollback.stderr
    assert table_uuid(projector, live) == loaded  # the table the load built serves again
    stop(projector, process, since)
    projector.catch_up()
    assert verified(projector, f"public.{table}") > EVENTS
    phases.done("rolled back, verified")
    print(f"\n{EVENTS:,} events: {phases}; readers' answers {[r.answers for r in readers]}")


def test_with_chdb_the_command_rebuilds_in_its_own_process(
    stack: StackHandle, tmp_path: Path
) -> None:
    """chDB: no projector runs beside the command, which does the projector's part itself."""
    projector = ProjectorProcess(stack, tmp_path)  # embedded chDB
    schema = shop_projection(stack, projector)
    projector.env["PROJECTOR_READ_MODEL_BACKFILL_CHUNK_KEYS"] = "50"
    NewOrdersOnly(stack.admin_dsn, schema, seed=10).run(rate_per_s=0, transactions=200)
    table = projector.table("ledger")
    stack.sql(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, amount int NOT NULL)")
    stack.sql(f"INSERT INTO {table} (amount) SELECT n FROM generate_series(1, 500) n")
    projector.env["PROJECTOR_TABLE_PATTERN"] += f"|{table}"
    projector.catch_up()
    (old,) = versions(projector, "order_summary")

    rebuilt = projector.cli("rebuild", "order_status")  # a model: its family is rebuilt
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    states = {v["version"]: v["state"] for v in versions(projector, "order_status")}
    assert sorted(states.values()) == ["previous", "serving"], states
    assert versions(projector, "order_summary") == [old]  # other families untouched
    replica = projector.cli("rebuild", f"public.{table}", "--from", "kafka")
    assert replica.returncode == 0, replica.stdout + replica.stderr
    assert "swapped" in replica.stdout + replica.stderr
    assert_replica_equals_source(stack, projector, table, ["id"])
    assert_equal_to_postgres(stack, projector, schema)

    # Retention removed the topic's start: a rebuild from Kafka would miss rows, and says so.
    dropped = projector.cli("rebuild", f"public.{table}", "--drop-old")
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    for future in admin.delete_records([TopicPartition(f"cdc.public.{table}", 0, 5)]).values():
        future.result(timeout=30)
    refused = projector.cli("rebuild", f"public.{table}", "--from", "kafka")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "--from snapshot" in refused.stderr and "retention" in refused.stderr, refused.stderr
