"""`projector rebuild SCHEMA.TABLE --from snapshot --where CONDITION`: only the matching rows are
read again, through Debezium's incremental snapshot, into the live table of a running projector
while the application writes; those rows are verified against Postgres, and rows outside the
condition are left exactly as they were (wrong, here, on purpose). A condition Postgres refuses
is refused before Debezium sees it.

Server backend only: the live table must move for the snapshot's reads to arrive, so the job runs
in `projector run` beside the command.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time

import httpx
import psycopg
import pytest

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.test_rebuild import start, stop
from tests.integration.test_rebuild_snapshot import snapshot_reads

ROWS = 3_000
INSIDE = "id <= 1000"  # the condition re-read
BROKEN_INSIDE = range(10, 30)  # rows the replica got wrong, inside the condition
BROKEN_OUTSIDE = range(2010, 2030)  # and outside it: must stay as wrong as they were


@pytest.fixture
def server_url(clickhouse_server: str) -> str:
    """The command runs beside a running projector: the server backend only."""
    return clickhouse_server


def test_a_partial_reread_repairs_the_matching_rows_only_while_writes_go_on(
    stack: StackHandle,
    projector: ProjectorProcess,
    server_url: str,
    started: list[subprocess.Popen[bytes]],
) -> None:
    table = projector.table("fix_items")
    stack.sql(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, qty int NOT NULL, note text)")
    stack.sql(
        f"INSERT INTO {table} (qty, note) SELECT n, 'n' || n FROM generate_series(1, {ROWS}) n"
    )
    projector.catch_up()
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.public.{table}"
    live = f"{projector.replica_db}.{table}"

    def ch(sql: str) -> None:
        httpx.post(server_url, content=sql, timeout=60).raise_for_status()

    # The replica goes wrong, inside and outside the condition: values changed, rows lost.
    broken = ", ".join(str(i) for i in [*BROKEN_INSIDE, *BROKEN_OUTSIDE])
    ch(f"ALTER TABLE {live} UPDATE qty = -1 WHERE id IN ({broken}) SETTINGS mutations_sync = 2")
    lost = "id IN (40, 41, 42, 2040, 2041, 2042)"
    ch(f"ALTER TABLE {live} DELETE WHERE {lost} SETTINGS mutations_sync = 2")

    process, since = start(projector, started)
    # Refused before Debezium hears of it: Postgres' own reason, nothing recorded as a job.
    for bad, reason in (
        ("no_such_column = 1", "no_such_column"),
        ("true; DROP TABLE " + table, "Postgres refused the condition"),
    ):
        refused = projector.cli("rebuild", f"public.{table}", "--where", bad, timeout_s=180)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert reason in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert stack.sql(f"SELECT count(*) FROM {table}") == [(ROWS,)]  # nothing dropped
    dry = projector.cli("rebuild", f"public.{table}", "--where", INSIDE, "--dry-run")
    assert dry.returncode == 0 and "1,000 row(s)" in dry.stderr, dry.stdout + dry.stderr

    writing = threading.Event()

    def write() -> None:  # updates inside and outside the condition, deletes inside, inserts
        rng = random.Random(5)
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            while not writing.is_set():
                conn.execute(
                    f"UPDATE {table} SET qty = qty + 1 WHERE id = %s", [rng.randrange(100, 1000)]
                )
                conn.execute(
                    f"UPDATE {table} SET note = 'w' WHERE id = %s", [rng.randrange(1100, 2000)]
                )
                conn.execute(f"DELETE FROM {table} WHERE id = %s", [rng.randrange(500, 1000)])
                conn.execute(f"INSERT INTO {table} (qty) VALUES (7)")
                time.sleep(0.02)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    start_offset = stack.end_offset(topic)
    try:
        done = projector.cli(
            "rebuild", f"public.{table}", "--from", "snapshot", "--where", INSIDE, timeout_s=300
        )
    finally:
        writing.set()
        writer.join(30)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report + projector.log.read_text()[-3000:]
    assert "re-read" in report and "equal to Postgres" in report, report
    stop(projector, process, since)
    projector.catch_up()

    # Debezium read the matching rows only.
    reads = [int(read["after"]["id"]) for _, read in snapshot_reads(stack, topic, start_offset)]
    assert reads and all(i <= 1000 for i in reads), sorted(set(reads))[-10:]
    # Inside the condition the replica equals Postgres again; outside, what was wrong still is.
    source = {
        row[0]: (row[1], row[2])
        for row in stack.sql(f"SELECT id, qty, note FROM {table} WHERE {INSIDE} ORDER BY id")
    }
    replica = {
        int(row["id"]): (int(row["qty"]), row["note"])
        for row in projector.sql(
            f"SELECT id, qty, note FROM {live} FINAL WHERE {INSIDE} AND NOT _is_deleted"
        )
    }
    assert replica == source
    outside = projector.sql(
        f"SELECT id, qty FROM {live} FINAL WHERE (id IN ({broken}) OR {lost}) AND id > 1000 "
        "AND NOT _is_deleted ORDER BY id"
    )
    assert [int(r["id"]) for r in outside] == list(BROKEN_OUTSIDE)  # 2040-2042 still lost
    assert all(int(r["qty"]) == -1 for r in outside), outside
    (job,) = projector.sql(f"SELECT state FROM {projector.control_db}.replica_rebuilds FINAL")
    assert job["state"] == "re-read"
