"""`projector table reset SCHEMA.TABLE`: rebuild a stopped table (its topic was re-created or
re-partitioned, or its key schema changed: projector/replicas/topic_guard.py says why such a
table stops, and why this is its remedy).

With no projector running, in order:
  1. read the end offset of every partition of the table's topic (`end_offsets`);
  2. drop the replica, resume every partition at its end, forget the topic's identity and the
     snapshot bounds recorded of it (`reset_stopped_table`, topic_guard.py's `reset_table`), and
     ask the read models' stage to recompute every key of the read models over the table (a key
     deleted in the skipped messages is in no later range: projector/read_models/stage.py);
  3. ask Debezium for an incremental snapshot of the table (`request_snapshot`), whose reads
     come after everything skipped in 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import TopicPartition

from projector import kafka
from projector.clickhouse import ident
from projector.commit.checkpoint import PROJECTION, CheckpointStore
from projector.config import ProjectorConfig, open_backend
from projector.read_models.stage import request_every_key
from projector.replicas.snapshot_sweep import SnapshotSweep
from projector.replicas.topic_guard import TopicGuard, reset_table


@dataclass(frozen=True)
class TableReset:
    replica: str  # the dropped replica, as ClickHouse names it (`replica_public`.`orders`)
    topic: str
    ends: dict[int, int]  # per partition, the offset the table resumes at


def end_offsets(config: ProjectorConfig, topic: str) -> dict[int, int] | None:
    """Step 1: per partition of `topic`, the offset the next message will get (None: Kafka has
    no such topic)."""
    consumer = kafka.consumer(config.kafka_bootstrap, config.group_id)
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return None
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in metadata.partitions
        }
    finally:
        consumer.close()


def reset_stopped_table(
    config: ProjectorConfig, table: str, topic: str, ends: dict[int, int]
) -> TableReset:
    """Step 2 for the source table `table` (SCHEMA.TABLE), its topic resuming at `ends`."""
    schema, name = table.split(".", 1)
    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    checkpoints.create()
    guard = TopicGuard(ch, config.control_database, PROJECTION, lambda _: None)
    guard.create()
    sweep = SnapshotSweep(ch, config.control_database, PROJECTION, lambda _: None)
    sweep.create()
    replica = f"{ident(config.replica_prefix + schema)}.{ident(name)}"
    reset_table(ch, guard, checkpoints, replica, topic, ends, sweep)
    if schema == config.read_model_schema:  # keys the new replica lacks leave the read models
        request_every_key(ch, config.control_database, topic)
    return TableReset(replica, topic, ends)


def request_snapshot(admin_dsn: str, table: str, publication: str | None = None) -> str:
    """Step 3: ask Debezium, through its signal table, for an incremental snapshot of `table`
    (with its row filter in `publication`); returns the signal's id."""
    import psycopg

    from connectors import request_incremental_snapshot

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        return request_incremental_snapshot(conn, [table], publication=publication)
