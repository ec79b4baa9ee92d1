"""An open intent whose messages Kafka's retention removed: a named stop, and the way back.

A crash leaves a batch half applied (its intent open); while the projector is away, retention
removes the first messages of that batch. Before, the next run waited for the exact range
forever, every partition of the member with it, saying nothing. Now it stops with the reason and
the remedy, and the remedy works: `projector reset` skips to what Kafka holds, the next run
applies the rest, and `projector rebuild --from snapshot` re-reads what was lost from Postgres.
On the server backend: the test writes the open intent itself, as a crash would have left it.
"""

from __future__ import annotations

import subprocess
import time

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from projector.commit.checkpoint import INTENT, PROJECTION, BatchRange, CheckpointStore
from projector.config import load_config, open_backend
from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source
from tests.integration.test_rebuild import start, stop


@one_backend("server")
def test_an_intent_retention_removed_stops_the_run_with_the_remedy_that_works(
    stack: StackHandle, projector: ProjectorProcess, started: list[subprocess.Popen[bytes]]
) -> None:
    table = projector.table("lost")
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.public.{table}"
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    stack.sql(f"INSERT INTO {table} SELECT n, n FROM generate_series(1, 10) n")
    projector.catch_up()
    assert stack.end_offset(topic) == 10
    stack.sql(f"INSERT INTO {table} SELECT n, n FROM generate_series(11, 30) n")  # offsets 10-29
    deadline = time.monotonic() + 60
    while stack.end_offset(topic) < 30:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    # A crash inside the batch 10-19 (its intent recorded under the partition's claim) ...
    ch = open_backend(load_config(env=projector.env))
    store = CheckpointStore(ch, projector.control_db, PROJECTION)
    claim = store.claims([(topic, 0)])[(topic, 0)]
    store.record(BatchRange(topic, 0, 10, 19), INTENT, claim.generation)
    # ... then retention removes offsets below 15 while the projector is away.
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    for future in admin.delete_records([TopicPartition(topic, 0, 15)]).values():
        future.result(timeout=30)

    stopped = projector.cli("run", "--until-kafka-end", timeout_s=180)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    said = " ".join(stopped.stderr.split())  # the console wraps long lines
    assert f"{topic}[0]: the open intent 10-19" in said, said[-3000:]
    assert "now starts at 15" in said, said[-3000:]
    remedy = f"projector reset public.{table} --to-offset 15 --partition 0"
    assert remedy in said and f"projector rebuild public.{table} --from snapshot" in said

    moved = projector.cli(*remedy.split()[1:], "--yes")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    projector.catch_up()
    live = f"{projector.replica_db}.{table}"
    rows = projector.sql(f"SELECT id FROM {live} FINAL ORDER BY id")
    # What Kafka still held is applied; the rows of offsets 10-14 (ids 11-15) are what was lost.
    assert [r["id"] for r in rows] == [*range(1, 11), *range(16, 31)], rows

    process, since = start(projector, started)
    rebuilt = projector.cli("rebuild", f"public.{table}", "--from", "snapshot", timeout_s=300)
    assert rebuilt.returncode == 0, (
        rebuilt.stdout + rebuilt.stderr + projector.log.read_text()[-3000:]
    )
    stop(projector, process, since)
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 30
