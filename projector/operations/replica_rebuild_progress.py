"""Replica rebuild jobs as a command sees them (`projector rebuild SCHEMA.TABLE`, `projector
reset`): the rebuilds of a configuration, the live table's positions a job chases, how far a job
has come, and whether Kafka still holds a table's whole history.

The jobs themselves, their states and why a rebuild is exact: projector/operations/replica_rebuild.py.
"""

from __future__ import annotations

from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import PROJECTION, CheckpointStore
from projector.config import ProjectorConfig
from projector.operations.replica_rebuild import LiveNext, ReplicaRebuild, ReplicaRebuilds
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters


def open_replica_rebuilds(config: ProjectorConfig, ch: ClickHouse) -> ReplicaRebuilds:
    """The rebuilds of `config`'s replica tables, their control table created; a shadow's sweep
    bounds take the topic's partition count as Kafka describes it now."""

    def partitions(topic: str) -> int | None:
        return len(rebuilds.topics.partitions(topic)) or None

    rebuilds = ReplicaRebuilds.for_config(
        config,
        ch,
        SchemaCache(config.registry_url),
        Upcasters.load(config.upcasters_file),
        partitions,
    )
    rebuilds.create()
    return rebuilds


def live_positions(config: ProjectorConfig, ch: ClickHouse) -> LiveNext:
    """Per partition, the next offset the live replica tables apply (None: nothing applied yet),
    from their checkpoints."""
    live = CheckpointStore(ch, config.control_database, PROJECTION)
    live.create()

    def live_next(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        found = live.load(keys)
        return {k: (found[k].resume_offset if k in found else None) for k in keys}

    return live_next


def job_progress(
    rebuilds: ReplicaRebuilds, job: ReplicaRebuild, live_next: LiveNext
) -> tuple[int, int]:
    """(events the job's shadow has applied, events up to the live table's position). A snapshot
    rebuild counts from where its shadow started (S1); a partial re-read, the events the live
    table applied since it started, of those up to the end of the snapshot's reads once known."""
    keys = [(job.topic, p) for p in rebuilds.topics.partitions(job.topic)]
    if job.where:
        first = sum(int(o) for o in job.snapshot.get("start", {}).values())
        applied = sum(v or 0 for v in live_next(keys).values()) - first
        end = sum(int(o) for o in job.snapshot.get("end", {}).values()) - first
        return applied, max(applied, end)
    done = rebuilds.job_store.checkpoints(job).load(keys)
    first = sum(int(o) for o in job.snapshot.get("start", {}).values())
    applied = sum(c.resume_offset for c in done.values()) - first
    total = sum(v or 0 for v in live_next(keys).values()) - first
    return applied, total


def kafka_history(rebuilds: ReplicaRebuilds, topic: str) -> tuple[dict[int, int | None], bool]:
    """Per partition of `topic`, the earliest offset Kafka retains, and whether that is the
    topic's whole history (every one 0): then `--from auto` rebuilds from Kafka, else from a
    snapshot (`ReplicaRebuilds.start`)."""
    earliest = rebuilds.topics.earliest(topic)
    lows = {p: earliest.get(p) for p in rebuilds.topics.partitions(topic)}
    return lows, all(low == 0 for low in lows.values())
