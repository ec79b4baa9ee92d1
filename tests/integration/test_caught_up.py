"""`projector run --until-caught-up` / `--until-lsn` / `--until-kafka-end` end where they promise.

- caught up means *with Postgres*: right after a burst of writes, before Debezium has produced
  the events, the command still returns only once every committed row is in ClickHouse;
- the finish line is fixed once: with 30 captured topics and Debezium's heartbeat transactions
  every 100 ms (the transaction topic's end moves all the time) the command returns at all.

The finish line itself, with fakes, is tested in tests/unit/test_finish_line.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg

from connectors import apply_connector, render_connector
from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess

# Generous: the command must return at all (a moving finish line never does); speed is the
# benchmarks' business, not these tests'.
RETURN_TIMEOUT_S = 120
# Longer than the projector takes to start and find Kafka applied to its end.
DEBEZIUM_LAG_S = 20


def watermark_projector(stack: StackHandle, tmp_path: Path) -> ProjectorProcess:
    """A test projector that reads Debezium's transaction topic (the harness turns it off)."""
    projector = ProjectorProcess(stack, tmp_path)
    projector.env["PROJECTOR_TRANSACTION_METADATA"] = "true"
    return projector


def replica_count(projector: ProjectorProcess, table: str) -> int:
    rows = projector.sql(f"SELECT count() AS n FROM {projector.replica_db}.{table} FINAL")
    return int(rows[0]["n"])


def write_rows(stack: StackHandle, table: str, ids: range, per_transaction: int) -> None:
    """Insert a row per id, `per_transaction` rows a transaction."""
    with psycopg.connect(stack.admin_dsn) as conn:
        for first in range(ids.start, ids.stop, per_transaction):
            conn.execute(
                f"INSERT INTO {table} SELECT i, 'row ' || i FROM generate_series(%s::int, %s::int) AS i",
                [first, min(ids.stop, first + per_transaction) - 1],
            )
            conn.commit()


def test_caught_up_returns_once_everything_committed_is_applied(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = watermark_projector(stack, tmp_path)
    table = projector.table("cu_burst")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    stack.apply()
    # Debezium lags behind the writer (here for certain: its task is stopped for a while), so
    # Kafka does not hold the burst yet when the command starts.
    connect, name = stack.connect, render_connector(stack.env)["name"]
    connect.stop(name)
    connect.wait_state(name, "STOPPED")
    resume = threading.Timer(DEBEZIUM_LAG_S, connect.resume, [name])
    try:
        write_rows(stack, table, range(10_000), per_transaction=1_000)
        resume.start()
        run = projector.cli("run", "--until-caught-up", timeout_s=600)
    finally:
        resume.join()
        connect.resume(name)
        connect.wait_running(name)
    assert run.returncode == 0, run.stderr[-3000:]
    assert replica_count(projector, table) == 10_000


def test_until_lsn_waits_for_the_writers_own_commit(stack: StackHandle, tmp_path: Path) -> None:
    projector = watermark_projector(stack, tmp_path)
    table = projector.table("cu_lsn")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    stack.apply()
    write_rows(stack, table, range(2_000), per_transaction=100)
    ((lsn,),) = stack.sql("SELECT pg_current_wal_lsn()::text")  # after the writer's commits
    run = projector.cli("run", "--until-lsn", lsn, timeout_s=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert replica_count(projector, table) == 2_000
    # A position that is not an LSN is refused before anything runs.
    bad = projector.cli("run", "--until-lsn", "16B3748")
    assert bad.returncode == 2 and "0/16B3748" in bad.stderr, bad.stderr
    both = projector.cli("run", "--until-caught-up", "--until-kafka-end")
    assert both.returncode == 2 and "one of" in both.stderr, both.stderr


def test_a_dead_letter_settles_its_transaction(stack: StackHandle, tmp_path: Path) -> None:
    """A transaction whose event went to the DLQ never completes for the watermark; the run
    counts it as settled instead of waiting for it forever."""
    projector = watermark_projector(stack, tmp_path)
    table = projector.table("cu_dead")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, placed date)")
    stack.apply()
    with psycopg.connect(stack.admin_dsn) as conn:
        # 2400 is beyond ClickHouse's Date32: a dead letter
        conn.execute(f"INSERT INTO {table} VALUES (1, '2024-01-01'), (2, '2400-01-01')")
    run = projector.cli("run", "--until-caught-up", timeout_s=RETURN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert replica_count(projector, table) == 1
    letters = projector.cli("dlq", "list", "--format", "json")
    assert f'"topic": "cdc.public.{table}"' in letters.stdout, letters.stdout
    # The table folds long names as `status` does: the whole topic name is there, on one or
    # more lines of its column, never cut with an ellipsis.
    shown = projector.cli("dlq", "list").stdout
    assert "…" not in shown, shown
    folded = "".join(
        line.split("│")[1].strip() for line in shown.splitlines() if line.count("│") > 2
    )
    assert f"cdc.public.{table}" in folded, shown


def test_caught_up_ends_with_thirty_topics_and_heartbeats_every_100_ms(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = watermark_projector(stack, tmp_path)
    tables = [projector.table(f"cu_many{i:02d}") for i in range(30)]
    for table in tables:
        stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    # Debezium commits a heartbeat transaction every 100 ms: the transaction topic never rests.
    apply_connector(stack.connect, stack.admin_dsn, {**stack.env, "HEARTBEAT_INTERVAL_MS": "100"})
    try:
        for table in tables:
            write_rows(stack, table, range(40), per_transaction=20)
        # Postgres' position as the command starts: every row written above, and it must end.
        first = projector.cli("run", "--until-caught-up", timeout_s=RETURN_TIMEOUT_S)
        assert first.returncode == 0, first.stderr[-3000:]
        counts = projector.sql(
            "SELECT count() AS n FROM ("
            + " UNION ALL ".join(f"SELECT id FROM {projector.replica_db}.{t} FINAL" for t in tables)
            + ")"
        )
        assert int(counts[0]["n"]) == 30 * 40
        for table in tables:
            write_rows(stack, table, range(40, 60), per_transaction=20)
        # Kafka's end as the command starts: whatever is in Kafka then, and it must end too.
        second = projector.cli("run", "--until-kafka-end", timeout_s=RETURN_TIMEOUT_S)
        assert second.returncode == 0, second.stderr[-3000:]
    finally:
        stack.apply()  # the default heartbeat interval again, for the other tests
