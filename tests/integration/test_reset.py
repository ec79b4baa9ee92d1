"""`projector reset`: a table re-reads its topic from an offset or a time, exactly.

Back, beside a running projector (server backend): the shop's orders re-read from offset 0
while writes go on; the replica and every read model fed by it still equal Postgres. On chDB (the
command moves a stopped projector's checkpoint): back to a time re-reads the events after it;
forward skips events, `verify` finds the missing rows, and a reset back to where it was repairs
them. Bad input is refused with the reason.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from datetime import UTC, datetime

from devstack.shop import ShopWriter
from tests.integration.conftest import PROJECTOR, StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.read_model_checks import assert_equal_to_postgres, shop_projection


def wait_for_log_since(projector: ProjectorProcess, since: int, text: str) -> None:
    """Wait until the projector logged `text` after byte `since` of its log."""
    deadline = time.monotonic() + 120
    while text not in projector.log.read_bytes()[since:].decode():
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.3)


def applied_in_run(log: str) -> int:
    """Events the last finished run applied (its closing line)."""
    found = re.findall(r"stopped: (\d+) events applied", log)
    assert found, log[-3000:]
    return int(found[-1])


def orders_lag(projector: ProjectorProcess, schema: str) -> int:
    """Events of the shop's orders topic not yet applied, from `projector status --json`."""
    shown = projector.cli("status", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = json.loads(shown.stdout)["projections"]
    return int(next(r for r in rows if r["name"] == f"{schema}.orders")["lag_events"])


@one_backend("server")
def test_a_table_reset_back_while_the_projector_runs_stays_exact(
    stack: StackHandle, projector: ProjectorProcess, started: list[subprocess.Popen[bytes]]
) -> None:
    schema = shop_projection(stack, projector)
    ShopWriter(stack.admin_dsn, schema, seed=21).run(rate_per_s=0, transactions=60)
    projector.catch_up()
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.{schema}.orders"
    end = stack.end_offset(topic)
    assert end > 20

    since = len(projector.log.read_bytes())
    process = projector.start()
    started.append(process)
    wait_for_log_since(projector, since, f"assigned {topic}[0]")
    reset = projector.cli("reset", f"{schema}.orders", "--to-offset", "0", "--yes")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    # the running projector paused the table, and resumed it once moved
    assert "pausing" in reset.stderr and "resuming" in reset.stderr, reset.stderr
    assert f"partition 0: moved from offset {end:,} to 0" in reset.stderr, reset.stderr
    assert f"re-reads {end:,} event(s)" in reset.stderr, reset.stderr
    # writes go on while it re-reads
    ShopWriter(stack.admin_dsn, schema, seed=22).run(rate_per_s=0, transactions=30)
    wait_for_log_since(projector, since, "`projector reset` moved it to offset 0")
    fence = stack.fence()
    deadline = time.monotonic() + 120
    # The fence rides its own topic: applied, it says the new writes are in, not that the
    # re-read of orders is done. That is the table's lag, as `projector status` reports it.
    while not projector.fence_applied(fence) or orders_lag(projector, schema) > 0:
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    run_log = projector.log.read_bytes()[since:].decode()
    # every event of orders before the reset was applied again in this run
    assert applied_in_run(run_log) >= end, run_log[-3000:]
    paused = run_log.index(f"paused {schema}.orders")
    assert (
        paused < run_log.index("moved it to offset 0") < run_log.index(f"resumed {schema}.orders")
    )

    projector.catch_up()
    verified = projector.cli("verify", f"{schema}.orders")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert_equal_to_postgres(stack, projector, schema)


@one_backend("chdb")
def test_reset_to_a_time_rereads_forward_skips_and_back_repairs(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("reset_items")
    qualified = f"public.{table}"
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.{qualified}"
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    stack.sql(f"INSERT INTO {table} SELECT n, n FROM generate_series(1, 10) n")
    projector.catch_up()
    assert stack.end_offset(topic) == 10
    time.sleep(1.5)  # Kafka timestamps are milliseconds: a clear gap
    between = datetime.now(UTC).isoformat()
    time.sleep(1.5)
    stack.sql(f"INSERT INTO {table} SELECT n, n FROM generate_series(11, 20) n")
    stack.sql(f"UPDATE {table} SET v = v + 100 WHERE id <= 3")
    stack.sql(f"DELETE FROM {table} WHERE id = 4")
    projector.catch_up()
    end = stack.end_offset(topic)  # 10 + 10 + 3 + a delete and its tombstone
    assert end == 25

    # bad input: the reason, and nothing moved
    for args, reason in [
        (["public.nope", "--to-offset", "0"], "unknown table public.nope: Kafka has no topic"),
        ([qualified, "--to-offset", "99"], f"outside what Kafka retains of {topic}[0]: 0 to 25"),
        ([qualified], "give one of --to-offset N or --to-time"),
        ([qualified, "--to-offset", "0", "--to-time", between], "give one of"),
        ([qualified, "--to-time", "yesterday"], "is not an ISO-8601 time"),
        ([qualified, "--to-offset", "0", "--partition", "3"], f"{topic} has no partition 3"),
    ]:
        refused = projector.cli("reset", *args, "--yes")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert reason in " ".join(refused.stderr.split()), refused.stderr

    # back to a time: the plan, then the move; the next run re-reads from the first event after it
    plan = projector.cli("reset", qualified, "--to-time", between, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "partition 0: offset 25 -> 10  re-reads 15 event(s)" in plan.stderr, plan.stderr
    declined = subprocess.run(
        [PROJECTOR, "reset", qualified, "--to-time", between],
        env=projector.env,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert declined.returncode == 1, declined.stdout + declined.stderr  # nothing moved
    assert f"reset {qualified}? [y/N]" in declined.stdout
    moved = projector.cli("reset", qualified, "--to-time", between, "--yes")
    assert moved.returncode == 0, moved.stderr
    assert "moved from offset 25 to 10" in moved.stderr, moved.stderr
    since = len(projector.log.read_bytes())
    projector.catch_up()
    run_log = projector.log.read_bytes()[since:].decode()
    assert f"{topic}[0]: `projector reset` moved it to offset 10" in run_log, run_log[-3000:]
    assert applied_in_run(run_log) >= 15 - 1  # the tombstone is not an event
    assert_replica_equals_source(stack, projector, table, ["id"])

    # forward: five new rows skipped; verify finds them missing; back to where it was repairs
    stack.sql(f"INSERT INTO {table} SELECT n, n FROM generate_series(21, 25) n")
    deadline = time.monotonic() + 60
    while stack.end_offset(topic) < 30:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    forward = projector.cli("reset", qualified, "--to-offset", "30", "--yes")
    assert forward.returncode == 0, forward.stderr
    text = " ".join(forward.stderr.split())
    assert "SKIPS 5 event(s)" in text and "WARNING: moving forward skips 5 event(s)" in text, text
    assert "--to-offset <old>` (old offsets: 0: 25)" in text, text
    projector.catch_up()
    drift = projector.cli("verify", qualified)
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert (drift.stdout + drift.stderr).count("postgres only") == 5, drift.stdout
    back = projector.cli("reset", qualified, "--to-offset", "25", "--yes")
    assert back.returncode == 0, back.stderr
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 24
    verified = projector.cli("verify", qualified)
    assert verified.returncode == 0, verified.stdout + verified.stderr
