"""Replica tables equal their Postgres tables after inserts, updates, deletes, truncates, schema
changes, unchanged TOAST values, compound keys and key re-use inside one batch."""

from __future__ import annotations

import json
import random
import uuid

import psycopg

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.topic_reader import read_topic_until


def test_crud_compound_key_and_reinsert_in_one_batch(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("rs_crud")
    stack.sql(
        f"CREATE TABLE {table} (region text, id int, qty int NOT NULL, price numeric(12,2),"
        " note text, PRIMARY KEY (region, id))"
    )
    stack.apply()
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        for i in range(50):
            conn.execute(
                f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s)",
                ["eu" if i % 2 else "us", i, i * 3, f"{i}.05", f"row {i}"],
            )
        conn.execute(f"UPDATE {table} SET qty = qty + 100, price = price * 2 WHERE id % 5 = 0")
        conn.execute(f"DELETE FROM {table} WHERE id % 7 = 0")
        # Delete then re-insert the same compound key: the row must end up present.
        conn.execute(f"DELETE FROM {table} WHERE region = 'eu' AND id = 1")
        conn.execute(f"INSERT INTO {table} VALUES ('eu', 1, 999, 1.00, 'back again')")
        conn.execute(f"UPDATE {table} SET note = NULL WHERE id = 3")
    projector.catch_up()
    rows = assert_replica_equals_source(stack, projector, table, ["region", "id"])
    assert rows == 50 - 8  # 0, 7, ..., 49 deleted; ('eu', 1) came back
    back = projector.sql(
        f"SELECT qty, _op FROM {projector.replica_db}.{table} FINAL WHERE region = 'eu' AND id = 1"
    )
    # Streamed ('c'), or read again by the table's first incremental snapshot ('r').
    assert len(back) == 1 and back[0]["qty"] == 999 and back[0]["_op"] in ("c", "r"), back


def test_unchanged_toast_value_is_never_overwritten(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("rs_toast")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, counter int, big text)")
    stack.sql(f"ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL")  # force out-of-line
    stack.apply()
    big = "".join(uuid.uuid4().hex for _ in range(2000))  # 64 kB, not compressible
    stack.sql(f"INSERT INTO {table} VALUES (1, 0, %s), (2, 0, %s)", [big, big[::-1]])
    projector.catch_up()  # the big value is stored before the updates arrive (placeholder → stored row)
    for _ in range(3):
        stack.sql(f"UPDATE {table} SET counter = counter + 1")  # `big` untouched: TOAST placeholder
    stack.sql(f"INSERT INTO {table} VALUES (3, 0, %s)", [big])
    stack.sql(f"UPDATE {table} SET counter = 7 WHERE id = 3")  # placeholder resolved inside a batch
    projector.catch_up()
    assert_replica_equals_source(stack, projector, table, ["id"])
    lengths = projector.sql(
        f"SELECT id, length(big) AS n FROM {projector.replica_db}.{table} FINAL ORDER BY id"
    )
    assert [r["n"] for r in lengths] == [64000, 64000, 64000]


# Columns Postgres TOASTs (stored out of line, EXTERNAL: never compressed inline), of every kind
# whose unchanged value arrives as Debezium's placeholder.
TOASTED_COLUMNS = "counter int, big text, blob bytea, doc jsonb, tags text[]"
TOASTED = ("big", "blob", "doc", "tags")
TOASTED_RENDER = {
    "blob": ("encode({}, 'hex')", "lower(hex({}))"),
    "doc": ("{}::text", "{}"),
    "tags": ("to_json({})::text", "toJSONString({})"),
}


def toasted_values(rng: random.Random) -> list[object]:
    """Values beyond the 2 kB TOAST threshold that do not compress (random hex, random bytes)."""

    def hexes(n: int) -> str:
        return rng.randbytes(n // 2).hex()

    return [hexes(8000), rng.randbytes(6000), json.dumps({"k": hexes(6000)}), [hexes(3000)] * 2]


def test_unchanged_toast_values_of_every_type_under_every_key_type(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    rng = random.Random(20261124)
    tables = {  # table → (key definition, key columns, key values of three rows)
        projector.table("rs_toast_num"): (
            "id numeric(10,2) PRIMARY KEY",
            ["id"],
            [("12.50",), ("7.00",), ("0.10",)],
        ),
        projector.table("rs_toast_text"): (
            "id text PRIMARY KEY",
            ["id"],
            [("a",), ("b b",), ("ü",)],
        ),
        projector.table("rs_toast_comp"): (
            "region text, id int, PRIMARY KEY (region, id)",
            ["region", "id"],
            [("eu", 1), ("us", 1), ("eu", 2)],
        ),
    }
    for table, (key_definition, _, _) in tables.items():
        stack.sql(f"CREATE TABLE {table} ({key_definition}, {TOASTED_COLUMNS})")
        for column in TOASTED:
            stack.sql(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")
    stack.apply()
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        for table, (_, key, keys) in tables.items():
            marks = ", ".join(["%s"] * (len(key) + 5))
            for values in keys[:2]:
                conn.execute(
                    f"INSERT INTO {table} VALUES ({marks})", [*values, 0, *toasted_values(rng)]
                )
    projector.catch_up()  # the TOASTed values are stored before the updates that omit them
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        for table, (_, key, keys) in tables.items():
            for _ in range(2):  # placeholders resolved from the stored row, then from the batch
                conn.execute(f"UPDATE {table} SET counter = counter + 1")
            marks = ", ".join(["%s"] * (len(key) + 5))
            conn.execute(
                f"INSERT INTO {table} VALUES ({marks})", [*keys[2], 0, *toasted_values(rng)]
            )
            conn.execute(f"UPDATE {table} SET counter = 7 WHERE counter = 0")
    projector.catch_up()  # exits non-zero if the projector died on the way
    for table, (_, key, _) in tables.items():
        assert (
            assert_replica_equals_source(stack, projector, table, key, render=TOASTED_RENDER) == 3
        )
    dead = projector.sql(f"SELECT count() AS n FROM {projector.control_db}.dlq")
    assert dead == [{"n": 0}], dead


def test_unchanged_toast_values_of_thousands_of_keys_in_one_batch(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    """One UPDATE of 6,000 rows whose TOASTed value stays: the stored values of 6,000 long keys
    are looked up for one batch, more key text than one ClickHouse statement takes
    (max_query_size): the look-up goes in bounded statements, and the batch applies whole."""
    table = projector.table("rs_toast_many")
    stack.sql(f"CREATE TABLE {table} (id text PRIMARY KEY, counter int, big text)")
    stack.sql(f"ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL")
    stack.apply()
    big = "".join(uuid.uuid4().hex for _ in range(70))  # 2,240 bytes: stored out of line
    stack.sql(
        f"INSERT INTO {table} SELECT 'key-' || lpad(i::text, 10, '0') || '-' || repeat('k', 40), "
        "0, %s FROM generate_series(1, 6000) AS i",
        [big],
    )
    projector.env["PROJECTOR_MAX_BATCH_MESSAGES"] = "20000"
    projector.catch_up()
    stack.sql(f"UPDATE {table} SET counter = counter + 1")  # `big` untouched: placeholders
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 6000
    assert "isolating the message" not in projector.log.read_text()  # applied whole
    dead = projector.sql(f"SELECT count() AS n FROM {projector.control_db}.dlq")
    assert dead == [{"n": 0}], dead


def test_truncate_then_new_rows(stack: StackHandle, projector: ProjectorProcess) -> None:
    table = projector.table("rs_trunc")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} SELECT g, 'old' FROM generate_series(1, 20) g")
    stack.sql(f"TRUNCATE {table}")
    stack.sql(f"INSERT INTO {table} VALUES (5, 'new'), (30, 'new')")
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 2


def test_added_column_and_several_schema_versions_in_one_topic(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("rs_ddl")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, a text)")
    stack.sql(f"INSERT INTO {table} VALUES (1, 'v1')")
    stack.apply()
    # Let row 1 reach its topic first (streamed: the table joined the publication when it was
    # created; or read by apply's snapshot): a snapshot read after the DROP below would
    # legitimately carry the newest schema (no `a`) and make the assertion on `a` moot.
    first = read_topic_until(
        stack.env["KAFKA_BOOTSTRAP"],
        f"cdc.public.{table}",
        stack.decoder(),
        done=lambda events: any(e.op in ("c", "r") for e in events),
    )
    assert any(e.op in ("c", "r") for e in first), "row 1 never reached its topic"
    stack.sql(f"ALTER TABLE {table} ADD COLUMN b int")
    stack.sql(f"INSERT INTO {table} VALUES (2, 'v2', 20)")
    stack.sql(f"ALTER TABLE {table} ADD COLUMN c text NOT NULL DEFAULT 'dflt'")
    stack.sql(f"INSERT INTO {table} VALUES (3, 'v3', 30, 'given')")
    stack.sql(f"ALTER TABLE {table} DROP COLUMN a")
    stack.sql(f"INSERT INTO {table} VALUES (4, 40, 'after drop')")
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 4
    # The dropped column stays in ClickHouse, with defaults for rows written after the drop.
    kept = projector.sql(f"SELECT id, a FROM {projector.replica_db}.{table} FINAL ORDER BY id")
    assert [r["a"] for r in kept] == ["v1", "v2", "v3", None]


def test_table_without_primary_key_is_append_only(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("rs_nopk")
    stack.sql(f"CREATE TABLE {table} (at int, msg text)")
    # Without a key Postgres needs this to publish updates; `apply` leaves the table out until
    # it is set (tests/integration/test_capture_safety.py).
    stack.sql(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b'), (2, 'b')")
    projector.catch_up()
    rows = assert_replica_equals_source(stack, projector, table, ["at", "msg"], append_only=True)
    assert rows == 3
    engine = projector.sql(
        f"SELECT engine FROM system.tables WHERE database = '{projector.replica_db}' AND name = '{table}'"
    )
    assert engine == [{"engine": "MergeTree"}]


def test_replica_table_shape(stack: StackHandle, projector: ProjectorProcess) -> None:
    table = projector.table("rs_shape")
    stack.sql(f"CREATE TABLE {table} (b int, a text, v int, PRIMARY KEY (b, a))")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1, 'x', 1)")
    projector.catch_up()
    info = projector.sql(
        "SELECT engine_full, sorting_key FROM system.tables "
        f"WHERE database = '{projector.replica_db}' AND name = '{table}'"
    )[0]
    assert info["sorting_key"] == "b, a"
    assert info["engine_full"].startswith("ReplacingMergeTree(_version, _is_deleted)")
    meta = projector.sql(
        f"SELECT _version, _is_deleted, _op, _lsn > 0 AS has_lsn, _tx_id > 0 AS has_tx "
        f"FROM {projector.replica_db}.{table}"
    )
    assert meta == [
        {"_version": meta[0]["_version"], "_is_deleted": 0, "_op": "r", "has_lsn": 0, "has_tx": 0}
    ] or (meta[0]["_op"] == "c" and meta[0]["has_lsn"] == 1 and meta[0]["has_tx"] == 1), meta
