"""The commit protocol: how a batch becomes an exactly-once effect in ClickHouse.

Kafka delivers at least once; this module makes the *effect* exactly once. For every batch of one
topic-partition, `BatchCommitter.commit` will:

  1. check the batch is the next one: it starts after the last applied offset (Kafka offsets may
     have gaps, never overlaps), or it is exactly the open intent being replayed;
  2. record the intent (projection, topic, partition, first and last offset) in the checkpoint
     table, *before* touching any target table;
  3. run the apply function, which inserts with deduplication tokens derived from
     (projection, target table, topic, partition, first, last, chunk): a replay of the same range
     sends the same tokens, and ClickHouse drops inserts it has already seen;
  4. record the batch as done.

Kafka offsets are committed afterwards only as a convenience for lag tools: on start-up the
checkpoint table, not the consumer group, says where each partition resumes, and a partition
whose last record is an intent replays exactly that range first, with the same tokens.

Checkpoint rows are versioned (`last_offset * 2 + done`) in a ReplacingMergeTree, so the newest
record per (projection, topic, partition) wins and re-recording the same state is harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.errors import CheckpointError

INTENT = "intent"
DONE = "done"


@dataclass(frozen=True)
class BatchRange:
    """An inclusive offset range of one topic-partition: the unit of atomic application."""

    topic: str
    partition: int
    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise CheckpointError(f"offsets must grow inside a batch: {self}")

    def token(self, projection: str, target: str, chunk: int | str = 0) -> str:
        """The deduplication token of one insert of this batch into `target`."""
        return (
            f"{projection}|{target}|{self.topic}|{self.partition}|{self.first}-{self.last}|{chunk}"
        )


@dataclass(frozen=True)
class PartitionCheckpoint:
    state: str
    first: int
    last: int

    @property
    def resume_offset(self) -> int:
        """Where consumption continues: the intent's first offset, or after the done batch."""
        return self.first if self.state == INTENT else self.last + 1


class CheckpointStore:
    def __init__(self, clickhouse: ClickHouse, database: str, projection: str) -> None:
        self.ch = clickhouse
        self.table = f"{ident(database)}.checkpoints"
        self.database = database
        self.projection = projection

    def create(self) -> None:
        self.ch.execute(f"CREATE DATABASE IF NOT EXISTS {ident(self.database)}")
        self.ch.execute(
            f"""CREATE TABLE IF NOT EXISTS {self.table} (
                `projection` String, topic String, `partition` Int32,
                first_offset Int64, last_offset Int64, state LowCardinality(String),
                version UInt64, recorded_at DateTime64(3) DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(version) ORDER BY (`projection`, topic, `partition`)"""
        )

    def load(
        self, partitions: list[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], PartitionCheckpoint]:
        """The newest record of every partition (or of the given ones)."""
        only = ""
        if partitions is not None:
            if not partitions:
                return {}
            wanted = ", ".join(f"({quote(t)}, {int(p)})" for t, p in partitions)
            only = f" AND (topic, `partition`) IN ({wanted})"
        rows = self.ch.rows(
            f"SELECT topic, partition, first_offset, last_offset, state FROM {self.table} FINAL "
            f"WHERE `projection` = {quote(self.projection)}{only}"
        )
        return {
            (r["topic"], int(r["partition"])): PartitionCheckpoint(
                r["state"], int(r["first_offset"]), int(r["last_offset"])
            )
            for r in rows
        }

    def record(self, batch: BatchRange, state: str) -> None:
        version = batch.last * 2 + (1 if state == DONE else 0)
        row = {
            "projection": self.projection, "topic": batch.topic, "partition": batch.partition,
            "first_offset": batch.first, "last_offset": batch.last, "state": state,
            "version": version,
        }  # fmt: skip
        # No dedup token: re-recording is idempotent by version, and must not be dropped.
        self.ch.execute(
            insert_statement(
                self.table, list(row), [row], token=f"cp|{batch.token(self.projection, state)}"
            )
        )


class BatchCommitter:
    """Applies batches under the protocol above and tracks each partition's resume offset."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.checkpoints = store.load()

    def refresh(self, partitions: list[tuple[str, int]]) -> None:
        """Read these partitions' checkpoints again: on assignment, since another member of the
        group may have applied them since this one last looked (a stale checkpoint would make it
        apply their batches a second time)."""
        fresh = self.store.load(partitions)
        for key in partitions:
            if key in fresh:
                self.checkpoints[key] = fresh[key]
            else:
                self.checkpoints.pop(key, None)

    def resume_offset(self, topic: str, partition: int) -> int | None:
        checkpoint = self.checkpoints.get((topic, partition))
        return None if checkpoint is None else checkpoint.resume_offset

    def pending_intent(self, topic: str, partition: int) -> BatchRange | None:
        checkpoint = self.checkpoints.get((topic, partition))
        if checkpoint is None or checkpoint.state != INTENT:
            return None
        return BatchRange(topic, partition, checkpoint.first, checkpoint.last)

    def commit(self, batch: BatchRange, apply: Callable[[BatchRange], None]) -> None:
        # 1. the batch must continue where the partition stopped (or replay the open intent)
        previous = self.checkpoints.get((batch.topic, batch.partition))
        if previous is not None:
            if previous.state == INTENT and (previous.first, previous.last) != (
                batch.first,
                batch.last,
            ):
                raise CheckpointError(
                    f"open intent {previous.first}-{previous.last} on {batch.topic}[{batch.partition}] "
                    f"must be replayed exactly, got {batch.first}-{batch.last}"
                )
            if previous.state == DONE and batch.first <= previous.last:
                raise CheckpointError(
                    f"batch {batch.first}-{batch.last} on {batch.topic}[{batch.partition}] overlaps "
                    f"the last applied offset {previous.last}"
                )
        # 2. intent before any effect
        self.store.record(batch, INTENT)
        self.checkpoints[(batch.topic, batch.partition)] = PartitionCheckpoint(
            INTENT, batch.first, batch.last
        )
        # 3. effects, deduplicated by tokens derived from the batch
        apply(batch)
        # 4. done
        self.store.record(batch, DONE)
        self.checkpoints[(batch.topic, batch.partition)] = PartitionCheckpoint(
            DONE, batch.first, batch.last
        )
