"""The read models' stage (projector/read_models/stage.py): exactly one process maintains them,
under a lease, from what the replicas committed — whichever processes run around it.

- A rolling deploy: two `projector run` processes with the same (default) settings overlap while
  the shop writes, then the first stops; the read models equal Postgres and their definitions.
- The maintainer away: a member that does not maintain applies the shop's transactions; the read
  models are then visibly behind (a `min_lsn` query waits instead of answering the old row), and
  exact once a maintaining process runs again. Then a table reset that skips deletes: the read
  models lose the deleted orders too.
- `projector dlq replay` beside `projector run`: the replayed row reaches the read models through
  the running stage.

Processes that run at the same time share one ClickHouse on the server backend only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg

from devstack.shop import ShopWriter
from tests.integration.conftest import PROJECTOR, StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.read_model_checks import (
    assert_equal_to_postgres,
    assert_reconciled,
    shop_projection,
)
from tests.integration.test_watermarks import commit, read_model_over

AWAY = {"PROJECTOR_MAINTAIN_READ_MODELS": "false"}


def start(
    projector: ProjectorProcess, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`projector run` as the deployment (overlaid by `env`), logging to a file of its own."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [PROJECTOR, "run"],
            env={**projector.env, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(what: str, done: object, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)


@one_backend("server")
def test_a_rolling_deploy_keeps_the_read_models_exact(
    stack: StackHandle,
    projector: ProjectorProcess,
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
) -> None:
    schema = shop_projection(stack, projector)
    writer = ShopWriter(stack.admin_dsn, schema, seed=23)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (writer.run(rate_per_s=60, transactions=1200), done.set()), daemon=True
    )
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    old = start(projector, old_log)
    started.append(old)
    wait_for("the first process holds the lease", lambda: b"lease taken" in old_log.read_bytes())
    thread.start()
    time.sleep(5)
    new = start(projector, new_log)  # same settings, same group: the deploy's next version
    started.append(new)
    wait_for("the second process applies", lambda: b"assigned" in new_log.read_bytes())
    time.sleep(10)  # both apply the shop's batches meanwhile
    assert old.poll() is None, old_log.read_text()[-3000:]
    assert b"lease taken" not in new_log.read_bytes(), "two maintainers at once"
    old.send_signal(signal.SIGTERM)
    assert old.wait(120) == 0, old_log.read_text()[-3000:]
    # The stopped process released the lease: the new one takes it at once and goes on.
    wait_for("the second process takes the lease", lambda: b"lease taken" in new_log.read_bytes())
    thread.join(300)
    assert done.is_set(), "the shop writer did not finish"
    for kind in ("status change", "cancellation", "removed line", "deleted order"):
        assert writer.stats.by_kind.get(kind, 0) > 0, f"no {kind}: {writer.stats.by_kind}"
    projector.catch_up()  # one more process in the group, beside the new one
    new.send_signal(signal.SIGTERM)
    assert new.wait(120) == 0, new_log.read_text()[-3000:]
    projector.catch_up()  # whatever the stopped process left
    assert_equal_to_postgres(stack, projector, schema)
    assert_reconciled(projector)


@one_backend("chdb")  # one process at a time here; the named queries read `read_models`
def test_the_read_models_follow_a_member_that_does_not_maintain_and_a_table_reset(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    schema = shop_projection(stack, projector)
    projector.env["PROJECTOR_TRANSACTION_METADATA"] = "true"  # read-your-writes
    writer = ShopWriter(stack.admin_dsn, schema, seed=29)
    writer.run(rate_per_s=0, transactions=120)
    projector.catch_up()
    assert_equal_to_postgres(stack, projector, schema)

    # The maintainer is away; a member that does not maintain applies everything that follows.
    writer.run(rate_per_s=0, transactions=250)
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        ((order_id,),) = conn.execute(
            f"UPDATE {schema}.orders SET status = 'CANCELLED', updated_at = now() WHERE id = "
            f"(SELECT min(id) FROM {schema}.orders WHERE status <> 'CANCELLED') RETURNING id"
        ).fetchall()
        ((lsn,),) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchall()
    away_env = projector.env
    projector.env = {**away_env, **AWAY}
    projector.catch_up()
    projector.env = away_env

    # Read-your-writes through the read models: the cancellation is in the replica, not in the
    # read model, so a reader asking for its LSN waits (and is told so), never the old row.
    query = ("query", "order_by_id", "--param", f"order_id={order_id}", "--format", "json")
    asked = projector.cli(*query, "--min-lsn", lsn, env={"PROJECTOR_QUERY_WAIT_MS": "2000"})
    assert asked.returncode == 3 and "still processing" in asked.stderr, (
        asked.returncode,
        asked.stdout,
        asked.stderr,
    )
    replica = projector.sql(
        f"SELECT status FROM {projector.replica_db.replace('public', schema)}.orders FINAL "
        f"WHERE id = {order_id}"
    )
    assert replica == [{"status": "CANCELLED"}], replica

    # The maintainer back: it recomputes what the other member applied.
    projector.catch_up()
    assert_equal_to_postgres(stack, projector, schema)
    assert_reconciled(projector)
    asked = projector.cli(*query, "--min-lsn", lsn)
    assert asked.returncode == 0, asked.stderr
    rows = [json.loads(line) for line in asked.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in rows] == ["CANCELLED"], asked.stdout

    # A table reset: orders deleted (with their lines) while no projector runs; the reset resumes
    # the orders topic at its end, so the replica never applies those deletes (it is
    # re-snapshotted whole), and no range ever shows them to the read models.
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        gone = [
            row[0] for row in conn.execute(f"SELECT id FROM {schema}.orders ORDER BY id LIMIT 5")
        ]
        conn.execute(f"DELETE FROM {schema}.order_items WHERE order_id = ANY(%s)", [gone])
        conn.execute(f"DELETE FROM {schema}.orders WHERE id = ANY(%s)", [gone])
    stack.fence_in_kafka()  # the deletes are in Kafka: the reset skips them
    projector.reset_table(
        f"{schema}.orders", lambda: assert_equal_to_postgres(stack, projector, schema)
    )
    assert_reconciled(projector)
    listed = ", ".join(str(i) for i in gone)
    rows = projector.sql(
        f"SELECT order_id FROM {projector.read_model_db}.order_summary WHERE order_id IN ({listed})"
    )
    assert rows == [], rows


@one_backend("server")
def test_dlq_replay_beside_run_reaches_the_read_models(
    stack: StackHandle,
    projector: ProjectorProcess,
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
) -> None:
    table, model = projector.table("stage_replay"), projector.table("stage_model")
    models = read_model_over(tmp_path, model, table)
    projector.env |= {
        "PROJECTOR_READ_MODEL_SCHEMA": "public",
        "PROJECTOR_READ_MODELS_FILE": str(models),
    }
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text, qty int)")
    stack.apply()
    commit(stack, f"INSERT INTO {table} VALUES (1, 'first', 1)")
    running = start(projector, tmp_path / "run.log")
    started.append(running)
    in_model = f"SELECT id FROM {projector.read_model_db}.{model} ORDER BY id"

    def ids() -> list[int]:
        try:
            return [int(r["id"]) for r in projector.sql(in_model)]
        except AssertionError:  # the read model is not created yet
            return []

    wait_for("row 1 in the read model", lambda: ids() == [1])
    # A renamed column: the next event is refused into the DLQ until an upcaster declares it.
    stack.sql(f"ALTER TABLE {table} RENAME COLUMN note TO remark")
    commit(stack, f"INSERT INTO {table} VALUES (2, 'second', 2)")

    def dead_letters() -> int:
        status = projector.cli("status", "--json")
        return int(json.loads(status.stdout)["dead_letters"]) if status.returncode == 0 else 0

    wait_for("the dead letter", lambda: dead_letters() == 1)
    upcasters = tmp_path / "upcasters.toml"
    upcasters.write_text(
        f'[[upcaster]]\ntable = "public.{table}"\nrenames = {{ note = "remark" }}\n'
    )
    replay = projector.cli(
        "dlq", "replay", "--topic", f"cdc.public.{table}",
        env={"PROJECTOR_UPCASTERS_FILE": str(upcasters)}, timeout_s=300,
    )  # fmt: skip
    said = replay.stdout + replay.stderr
    assert replay.returncode == 0 and "replayed 1, still dead 0" in said, said
    # The running process's stage recomputes the replayed offset.
    wait_for("row 2 in the read model", lambda: ids() == [1, 2])
    reconcile = projector.cli("read-models", "reconcile")
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    running.send_signal(signal.SIGTERM)
    assert running.wait(120) == 0, (tmp_path / "run.log").read_text()[-3000:]
