"""The fast path (ClickHouse decoding raw Avro) gives exactly the tables of the per-message path.

Two projectors read the same topics, one with the fast path on (the default), one with it off,
on either backend: embedded chDB (the messages in files) or a ClickHouse server (the messages sent
with the statement as external data).
The workload covers every type with an SQL form, NULLs, defaults, deletes, a schema change inside
one batch, unchanged-TOAST placeholders, a truncate, types without an SQL form and a poison
message. After each phase both replicas hold, per key, the same newest row: every column and every
metadata column, deletion markers included (background merges may have dropped older versions in
one and not the other, so older versions are not compared).
"""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaException

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source

TYPED_COLUMNS = """
    id bigint PRIMARY KEY, c_smallint smallint, c_int int NOT NULL DEFAULT 7,
    c_numeric numeric(12,3), c_numeric_wide numeric(40,10), c_real real, c_double double precision,
    c_bool boolean, c_text text NOT NULL DEFAULT 'plain', c_varchar varchar(20), c_bytea bytea,
    c_date date, c_timestamp timestamp, c_timestamp3 timestamp(3), c_timestamptz timestamptz,
    c_interval interval, c_uuid uuid, c_json jsonb, c_money money
"""


def random_typed_row(rng: random.Random, key: int) -> list[Any]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.15 else value

    def or_infinity(value: str) -> str:
        """Sometimes Postgres' infinity instead (an open-ended `valid_to`)."""
        return rng.choice(["infinity", "-infinity"]) if rng.random() < 0.1 else value

    return [
        key,
        maybe(rng.randint(-32768, 32767)),
        rng.randint(-(2**31), 2**31 - 1),
        maybe(f"{rng.randint(-(10**8), 10**8)}.{rng.randint(0, 999):03d}"),
        maybe(f"{rng.randint(-(10**29), 10**29)}.{rng.randint(0, 10**10 - 1):010d}"),
        maybe(rng.choice([float("nan"), float("inf"), -1.5, 3.25, 1e30])),
        maybe(rng.choice([float("-inf"), 1e-300, -1.0000000000000002, 0.1])),
        maybe(rng.random() < 0.5),
        rng.choice(["plain", "üñíçødé ✓ 'quoted' \\ back", "", "x" * 300]),
        maybe("v" * rng.randint(0, 20)),
        maybe(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))),
        maybe(
            or_infinity(
                f"{rng.randint(1900, 2299)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            )
        ),
        maybe(
            or_infinity(f"{rng.randint(1900, 2299)}-01-02 03:04:05.{rng.randint(0, 999999):06d}")
        ),
        maybe(or_infinity(f"19{rng.randint(10, 99)}-06-30 12:00:00.{rng.randint(0, 999):03d}")),
        maybe(
            or_infinity(f"20{rng.randint(10, 99)}-01-02 03:04:05.{rng.randint(0, 999999):06d}+02")
        ),
        maybe(f"{rng.randint(0, 3)} years {rng.randint(-5, 5)} days 04:05:06.5"),
        maybe(str(uuid.UUID(int=rng.getrandbits(128)))),
        maybe('{"a": [1, 2.5, null], "b": "ü"}'),
        maybe(f"{rng.randint(-(10**6), 10**6)}.{rng.randint(0, 99):02d}"),
    ]


def test_fast_path_equals_per_message_path(
    stack: StackHandle, tmp_path: Path, server_url: str | None
) -> None:
    fast = ProjectorProcess(stack, tmp_path / "fast", server_url=server_url)
    slow = ProjectorProcess(stack, tmp_path / "slow", server_url=server_url)
    for p in (fast, slow):
        (tmp_path / ("fast" if p is fast else "slow")).mkdir()
        p.env["PROJECTOR_MAX_BATCH_MESSAGES"] = "5000"  # a phase's events make one batch
    slow.env["PROJECTOR_TABLE_PATTERN"] = fast.env["PROJECTOR_TABLE_PATTERN"]
    slow.env["PROJECTOR_FAST_PATH"] = "false"
    typed, toast, other = fast.table("fp_typed"), fast.table("fp_toast"), fast.table("fp_other")
    stack.sql(f"CREATE TABLE {typed} ({TYPED_COLUMNS})")
    stack.sql(f"CREATE TABLE {toast} (id int PRIMARY KEY, counter int, big text)")
    stack.sql(f"ALTER TABLE {toast} ALTER COLUMN big SET STORAGE EXTERNAL")
    stack.sql(f"CREATE TABLE {other} (id int PRIMARY KEY, at time, tags text[])")
    stack.apply()
    rng = random.Random(20261123)
    keys = {typed: ["id"], toast: ["id"], other: ["id"]}

    # Phase 1: inserts (with NULLs and defaults), updates, deletes, in the fast path's types.
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        marks = ", ".join(["%s"] * 19)
        for key in range(1, 301):
            conn.execute(f"INSERT INTO {typed} VALUES ({marks})", random_typed_row(rng, key))
        conn.execute(f"INSERT INTO {typed} (id) VALUES (1000)")  # every default
        for key in rng.sample(range(1, 301), 100):
            row = random_typed_row(rng, key)
            conn.execute(f"DELETE FROM {typed} WHERE id = %s", [key])
            conn.execute(f"INSERT INTO {typed} VALUES ({marks})", row)
        conn.execute(f"UPDATE {typed} SET c_int = c_int / 2, c_text = 'updated' WHERE id % 3 = 0")
        conn.execute(f"DELETE FROM {typed} WHERE id % 11 = 0")
    phase_log = catch_up_both(stack, fast, slow, list(keys))
    assert fast_share(phase_log) == (True, True), phase_log  # all applied by the fast path
    compare(fast, slow, {typed: ["id"]})

    # Phase 2: a schema change between events of one batch (two segments), TOAST placeholders
    # and a truncate (their batches take the per-message path), types without an SQL form.
    big = "".join(uuid.uuid4().hex for _ in range(2000))
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {typed} SET c_text = 'before the change' WHERE id % 5 = 0")
        conn.execute(f"ALTER TABLE {typed} ADD COLUMN c_extra int NOT NULL DEFAULT 5")
        conn.execute(f"INSERT INTO {typed} (id, c_extra) VALUES (2001, 1), (2002, 2)")
        conn.execute(f"UPDATE {typed} SET c_extra = c_extra + id WHERE id % 5 = 1")
        conn.execute(f"DELETE FROM {typed} WHERE id % 13 = 0")
        conn.execute(f"INSERT INTO {toast} VALUES (1, 0, %s), (2, 0, %s)", [big, big[::-1]])
        conn.execute(f"UPDATE {toast} SET counter = counter + 1")
        conn.execute(f"INSERT INTO {other} VALUES (1, '12:34:56.5', ARRAY['a', NULL])")
        conn.execute(f"TRUNCATE {other}")
        conn.execute(f"INSERT INTO {other} VALUES (2, '00:00:01', ARRAY[]::text[])")
    phase_log = catch_up_both(stack, fast, slow, list(keys))
    assert fast_share(phase_log) == (True, False), phase_log  # some fast, some per-message
    compare(fast, slow, keys)

    # Phase 3: a poison message (a date ClickHouse cannot hold) among good ones: ClickHouse
    # rejects the fast insert, the per-message path dead-letters exactly the poison message.
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {typed} (id, c_date) VALUES (3001, '2024-01-01')")
        conn.execute(f"INSERT INTO {typed} (id, c_date) VALUES (3002, '2400-01-01')")
        conn.execute(f"UPDATE {typed} SET c_int = -1 WHERE id = 3001")
    log_before = fast.log.read_text()
    phase_log = catch_up_both(stack, fast, slow, list(keys))
    assert "rejected the fast insert" in fast.log.read_text()[len(log_before) :]
    compare(fast, slow, keys)
    dead = [
        p.sql(f"SELECT offset, stage, error FROM {p.control_db}.dlq ORDER BY offset")
        for p in (fast, slow)
    ]
    assert dead[0] == dead[1] and len(dead[0]) == 1, dead
    assert dead[0][0]["stage"] == "convert", dead
    assert "c_date" in dead[0][0]["error"] and "outside ClickHouse's range" in dead[0][0]["error"]
    assert_replica_equals_source(stack, fast, toast, ["id"])


def catch_up_both(
    stack: StackHandle, fast: ProjectorProcess, slow: ProjectorProcess, tables: list[str]
) -> str:
    """Catch both projectors up to the same messages; the fast one's log lines of this phase.
    Debezium's incremental snapshot of the new tables may still emit reads after a fence, so the
    round is repeated until no table topic grew during it: then both applied every message."""
    start = len(fast.log.read_text()) if fast.log.exists() else 0

    def ends() -> list[int]:
        found = []
        for table in tables:
            try:
                found.append(stack.end_offset(f"cdc.public.{table}"))
            except KafkaException:  # no event yet, no topic
                found.append(0)
        return found

    while True:
        stack.fence_in_kafka()  # the phase's events are out of Debezium: one round mostly does
        before = ends()
        fast.catch_up()
        slow.catch_up()
        if ends() == before:
            return fast.log.read_text()[start:]


def fast_share(log: str) -> tuple[bool, bool]:
    """(some events went the fast path, all of them did), from the runs' final log lines."""
    runs = [
        tuple(map(int, m)) for m in re.findall(r"(\d+) events applied \((\d+) by the fast", log)
    ]
    applied, fast = sum(r[0] for r in runs), sum(r[1] for r in runs)
    return fast > 0, fast == applied


def compare(fast: ProjectorProcess, slow: ProjectorProcess, keys: dict[str, list[str]]) -> None:
    for table, key in keys.items():
        rows = [latest_per_key(p, table, key) for p in (fast, slow)]
        assert rows[0].keys() == rows[1].keys(), f"{table}: different keys"
        for k in rows[0]:
            assert rows[0][k] == rows[1][k], (
                f"{table} key {k}: fast {rows[0][k]} != slow {rows[1][k]}"
            )


def latest_per_key(p: ProjectorProcess, table: str, key: list[str]) -> dict[tuple, dict[str, Any]]:
    """Newest stored row (by `_version`) of every key, deletion markers included; bytea as hex.
    Every stored column (`*`: a replica table has no MATERIALIZED or ALIAS column, and its
    EPHEMERAL input columns are not stored) but the ingestion time, in one read."""
    bytea = " REPLACE (hex(c_bytea) AS c_bytea)" if table.startswith("fp_typed_") else ""
    rows = p.sql(
        f"SELECT * EXCEPT (_ingested_at){bytea} FROM {p.replica_db}.{table} ORDER BY _version"
    )
    newest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        newest[tuple(row[k] for k in key)] = row
    assert newest, f"{table} is empty in {p.replica_db}"
    return newest
