"""Exactly-once effect through crashes: a continuous random write load on several tables (one
ALTER in the middle, large TOASTed values, poison messages in a captured topic) while the projector
is killed with SIGKILL at random moments and restarted; at the end every replica table equals
Postgres row by row, and the poison messages are in the dead-letter queue exactly once each."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
from confluent_kafka import Producer

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.topic_reader import read_topic_until

KILLS = 10
TIMESTAMP_TEXT = ("to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')", "toString({})")


@dataclass
class Tables:
    suffix: str

    @property
    def accounts(self) -> str:
        return f"cr_accounts_{self.suffix}"

    @property
    def lines(self) -> str:
        return f"cr_lines_{self.suffix}"

    @property
    def notes(self) -> str:
        return f"cr_notes_{self.suffix}"

    def create(self, stack: StackHandle) -> None:
        stack.sql(
            f"CREATE TABLE {self.accounts} (id bigint PRIMARY KEY, name text NOT NULL,"
            " balance numeric(14,2), score double precision, active boolean, born date,"
            " seen_at timestamptz, tags text[] NOT NULL DEFAULT '{}', doc jsonb, blob bytea,"
            " ref uuid)"
        )
        stack.sql(
            f"CREATE TABLE {self.lines} (tenant int, seq int, amount numeric, kind text,"
            " at timestamp, PRIMARY KEY (tenant, seq))"
        )
        stack.sql(f"CREATE TABLE {self.notes} (id int PRIMARY KEY, body text, counter int)")
        stack.sql(f"ALTER TABLE {self.notes} ALTER COLUMN body SET STORAGE EXTERNAL")

    def assert_replicas_equal_source(
        self, stack: StackHandle, projector: ProjectorProcess
    ) -> tuple[int, int, int]:
        """Each table equals its replica row by row; their row counts."""
        accounts = assert_replica_equals_source(
            stack,
            projector,
            self.accounts,
            ["id"],
            render={
                "seen_at": TIMESTAMP_TEXT,
                "blob": ("encode({}, 'hex')", "lower(hex({}))"),
                "score": ("lower({}::text)", "toString({})"),
                "doc": ("{}::text", "{}"),
                "balance": ("trim_scale({})::text", "toString({})"),
                "tags": ("to_json({})::text", "toJSONString({})"),
            },
        )
        lines = assert_replica_equals_source(
            stack,
            projector,
            self.lines,
            ["tenant", "seq"],
            render={
                "at": ("to_char({}, 'YYYY-MM-DD HH24:MI:SS.US')", "toString({})"),
                "amount": ("trim_scale({})::text", "{}"),
            },
        )
        notes = assert_replica_equals_source(stack, projector, self.notes, ["id"])
        return accounts, lines, notes


class Workload(threading.Thread):
    """Random transactions of inserts, updates and deletes, like an application would write them;
    half-way through, an `ALTER TABLE ... ADD COLUMN` and writes that use the new column."""

    def __init__(self, dsn: str, tables: Tables, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.tables, self.rng = dsn, tables, random.Random(seed)
        self.stop = threading.Event()
        self.altered = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        for _ in range(self.rng.randint(1, 5)):
                            self.statement(conn)
                    self.transactions += 1
                    if self.transactions == 300:
                        with conn.transaction():
                            conn.execute(
                                f"ALTER TABLE {self.tables.accounts} ADD COLUMN region text"
                                " NOT NULL DEFAULT 'eu'"
                            )
                        self.altered.set()
                    time.sleep(0.004)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def statement(self, conn: psycopg.Connection) -> None:
        rng, t = self.rng, self.tables
        table = rng.choice(["accounts", "accounts", "lines", "notes"])
        roll = rng.random()
        if table == "accounts":
            key = rng.randint(1, 300)
            if roll < 0.5:
                columns = "id, name, balance, score, active, born, seen_at, tags, doc, blob, ref"
                values = [
                    key,
                    f"name {rng.random():.6f}",
                    f"{rng.uniform(-1e6, 1e6):.2f}",
                    rng.choice([rng.uniform(-1, 1), float("nan"), float("inf")]),
                    rng.choice([True, False, None]),
                    f"19{rng.randint(10, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                    f"2026-11-{rng.randint(10, 28)} {rng.randint(0, 23)}:{rng.randint(0, 59)}:07.{rng.randint(0, 999999):06d}+01",
                    [f"t{rng.randint(0, 9)}" for _ in range(rng.randint(0, 3))],
                    f'{{"n": {rng.randint(0, 99)}, "s": "x"}}',
                    rng.randbytes(rng.randint(0, 16)),
                    str(uuid.UUID(int=rng.getrandbits(128))),
                ]
                if self.altered.is_set():
                    columns += ", region"
                    values.append(rng.choice(["us", "apac", "eu"]))
                marks = ", ".join(["%s"] * len(values))
                conn.execute(
                    f"INSERT INTO {t.accounts} ({columns}) VALUES ({marks}) "
                    "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, balance = EXCLUDED.balance",
                    values,
                )
            elif roll < 0.85:
                conn.execute(
                    f"UPDATE {t.accounts} SET balance = balance + 1.01, active = NOT active, "
                    "tags = tags || 'u'::text WHERE id BETWEEN %s AND %s",
                    [key, key + rng.randint(0, 5)],
                )
            else:
                conn.execute(f"DELETE FROM {t.accounts} WHERE id = %s", [key])
        elif table == "lines":
            tenant, seq = rng.randint(1, 4), rng.randint(1, 150)
            if roll < 0.6:
                conn.execute(
                    f"INSERT INTO {t.lines} VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [
                        tenant,
                        seq,
                        f"{rng.uniform(-1e4, 1e4):.{rng.randint(0, 9)}f}",
                        rng.choice(["sale", "refund", None]),
                        f"2025-0{rng.randint(1, 9)}-11 08:00:0{rng.randint(0, 9)}",
                    ],
                )
            elif roll < 0.85:
                conn.execute(
                    f"UPDATE {t.lines} SET amount = amount * 2, kind = 'adjusted' "
                    "WHERE tenant = %s AND seq = %s",
                    [tenant, seq],
                )
            else:
                conn.execute(
                    f"DELETE FROM {t.lines} WHERE tenant = %s AND seq <= %s", [tenant, seq // 10]
                )
        else:
            key = rng.randint(1, 40)
            if roll < 0.3:
                body = "".join(
                    uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(200)
                )  # 6.4 kB
                conn.execute(
                    f"INSERT INTO {t.notes} VALUES (%s, %s, 0) ON CONFLICT (id) DO UPDATE "
                    "SET body = EXCLUDED.body",
                    [key, body],
                )
            elif roll < 0.9:  # `body` untouched: Debezium sends the unchanged-TOAST placeholder
                conn.execute(f"UPDATE {t.notes} SET counter = counter + 1 WHERE id = %s", [key])
            else:
                conn.execute(f"DELETE FROM {t.notes} WHERE id = %s", [key])


def produce_poison(bootstrap: str, topic: str) -> list[int]:
    """Two messages no decoder can read, into a captured topic; returns their offsets."""
    producer = Producer({"bootstrap.servers": bootstrap})
    offsets: list[int] = []

    def delivered(err: object, msg: object) -> None:
        assert err is None, err
        offsets.append(msg.offset())  # type: ignore[attr-defined]

    unknown_schema_id = b"\x00" + (987_654_321).to_bytes(4, "big") + b"\x02\x04ab"
    for value in (b"definitely not Avro", unknown_schema_id):
        producer.produce(topic, key=b"poison", value=value, partition=0, on_delivery=delivered)
        producer.flush(10)
    return offsets


def dlq_topic_offsets(stack: StackHandle, topic: str, origin_topic: str) -> set[int]:
    """Origin offsets of the dead letters of `origin_topic` on the DLQ topic, read to its end."""
    found: set[int] = set()
    for msg in stack.messages_to_end(topic):
        headers = {k: v.decode() for k, v in (msg.headers() or [])}
        if headers.get("origin.topic") == origin_topic:
            found.add(int(headers["origin.offset"]))
    return found


def test_sigkill_at_random_moments_under_load_ends_equal_to_postgres(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    tables = Tables(projector.unique)
    tables.create(stack)
    stack.apply()
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    workload = Workload(stack.admin_dsn, tables, seed)
    workload.start()
    poison_topic, poison_offsets = f"cdc.public.{tables.notes}", []
    # On a server the same protocol runs through HTTP, and test_scale_out kills members on one
    # too: half the kills there keep the suite's time in bounds.
    kills = KILLS if projector.server_url is None else KILLS // 2
    try:
        for kill in range(kills):
            process, since = projector.start_in_a_group_of_its_own(kill)
            projector.wait_until_assigned(process, since)
            time.sleep(rng.uniform(0, 3.5))  # while it resumes (replays an open intent) or applies
            assert process.poll() is None, projector.log.read_text()[-3000:]
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            if kill == kills // 2:
                poison_offsets = produce_poison(stack.env["KAFKA_BOOTSTRAP"], poison_topic)
        assert workload.altered.is_set(), "the workload never reached its ALTER TABLE"
    finally:
        workload.stop.set()
        workload.join(30)
    assert workload.error is None, f"workload failed (seed {seed}): {workload.error!r}"

    projector.catch_up()
    context = f"seed {seed}, {workload.transactions} transactions"
    assert all(tables.assert_replicas_equal_source(stack, projector)), context

    dead = projector.sql(
        f"SELECT offset, stage FROM {projector.control_db}.dlq FINAL "
        f"WHERE topic = '{poison_topic}' ORDER BY offset"
    )
    assert [int(d["offset"]) for d in dead] == poison_offsets, context
    assert [d["stage"] for d in dead] == ["decode", "schema"], dead
    kafka_dlq = dlq_topic_offsets(stack, "projector.dlq", poison_topic)
    assert kafka_dlq == set(poison_offsets), kafka_dlq


@one_backend("chdb")
def test_sigterm_finishes_the_batch_and_exits_zero(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("cr_term")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 2000) g")
    process = projector.start()
    deadline = time.monotonic() + 120
    while "projector run starting" not in projector.log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, projector.log.read_text()
        time.sleep(0.1)
    time.sleep(2)  # into start-up or a batch: either way the stop waits for it
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, projector.log.read_text()[-3000:]
    assert "stopped:" in projector.log.read_text()
    stack.sql(f"UPDATE {table} SET v = -v WHERE id % 3 = 0")
    projector.catch_up()  # resumes from the checkpoints the stopped run left
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 2000


@one_backend("server")
def test_dlq_commands_show_and_list_dead_letters(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("cr_dlq")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1)")
    projector.catch_up()
    topic = f"cdc.public.{table}"
    offsets = produce_poison(stack.env["KAFKA_BOOTSTRAP"], topic)
    stack.sql(f"INSERT INTO {table} VALUES (2)")  # good events flow on after the poison
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 2

    listed = projector.cli("dlq", "list", "--limit", "1000", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    ours = [json.loads(line) for line in listed.stdout.splitlines() if topic in line]
    assert [(int(d["offset"]), d["stage"]) for d in ours] == [
        (offsets[0], "decode"),
        (offsets[1], "schema"),
    ], ours
    assert "unknown schema id 987654321" in ours[1]["error"], ours
    shown = projector.cli("dlq", "show", topic, "0", str(offsets[1]))
    assert shown.returncode == 0, shown.stderr
    assert '"stage": "schema"' in shown.stdout and "987654321" in shown.stdout, shown.stdout
    missing = projector.cli("dlq", "show", topic, "0", "999999")
    assert missing.returncode == 2 and "no dead letter" in missing.stderr


@one_backend("chdb")
def test_registry_outage_is_retried_logged_once_and_loses_nothing(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("cr_outage")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 300) g")
    events = read_topic_until(
        stack.env["KAFKA_BOOTSTRAP"],
        f"cdc.public.{table}",
        stack.decoder(),
        done=lambda evs: len({e.key["id"] for e in evs if e.key}) >= 300,
    )
    assert len(events) >= 300, "Debezium did not deliver the rows"

    registry = urlsplit(stack.env["REGISTRY_URL"])
    proxy = TcpProxy(registry.hostname or "127.0.0.1", registry.port or 80)
    proxy.cut()
    projector.env["REGISTRY_URL"] = registry._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    process = projector.start()
    try:
        projector.wait_for_log("retrying with back-off")  # it met the dead registry
        time.sleep(3)  # several back-off rounds against it (start-up may take longer than that)
        assert process.poll() is None, projector.log.read_text()[-3000:]
        proxy.restore()
        projector.wait_for_log("recovered after")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, projector.log.read_text()[-3000:]
    log = projector.log.read_text()
    projector.catch_up()
    assert log.count("retrying with back-off") == 1, log[-3000:]  # once per state change
    assert log.count("recovered after") == 1, log[-3000:]
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 300
