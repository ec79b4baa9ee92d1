"""The commit protocol: how a batch becomes an exactly-once effect in ClickHouse.

Kafka delivers at least once; this module makes the *effect* exactly once. The whole protocol is
here, in the order it runs.

When partitions are assigned, `BatchCommitter.assign` will:

  A. read their checkpoints afresh from ClickHouse (another member of the group may have applied
     them since this one last looked; a cached checkpoint would apply its batches twice);
  B. position each partition where the checkpoint says: at an open intent's first offset, after
     the last done batch, or at the beginning — the checkpoint table, not the consumer group's
     committed offsets, is the truth;
  C. mark a partition whose last record is an intent for exact replay: `cut_batch` then cuts
     exactly that range again, so the replay sends the same tokens.

For every batch of one topic-partition, `BatchCommitter.commit` will:

  1. check the batch is the next one: it starts after the last applied offset (Kafka offsets may
     have gaps, never overlaps), or it is exactly the open intent being replayed;
  2. record the intent (projection, topic, partition, first and last offset) in the checkpoint
     table, *before* touching any target table;
  3. run the apply function, which inserts with deduplication tokens derived from
     (projection, target table, topic, partition, first, last, chunk): a replay of the same range
     sends the same tokens, and ClickHouse drops inserts it has already seen;
  4. record the batch as done.

And afterwards, `acknowledge` will:

  5. commit the Kafka offset after the batch, only as a convenience for lag tools (step B never
     reads it).

Checkpoint rows are versioned (`last_offset * 2 + done`) in a ReplacingMergeTree, so the newest
record per (projection, topic, partition) wins and re-recording the same state is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, TopicPartition

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.errors import CheckpointError

# The projection whose checkpoints these are: the replica tables (and, in their batches, the read
# models). Part of every checkpoint key and deduplication token.
PROJECTION = "replica"
M = TypeVar("M")

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


@dataclass(frozen=True)
class Resume:
    """Where an assigned partition continues, and the open intent to replay first (if any)."""

    topic: str
    partition: int
    offset: int
    replay: BatchRange | None


def cut_batch(
    buffer: Sequence[M],
    offset_of: Callable[[M], int],
    replay: BatchRange | None,
    max_messages: int,
    drain: bool,
) -> tuple[Sequence[M], Sequence[M]]:
    """(the next batch, what stays buffered) of one partition's consumed messages, in offset
    order. C: while an open intent waits for replay, the batch is exactly its range — nothing
    until the buffer reaches the intent's last offset. Otherwise a batch is `max_messages`
    messages, or whatever is buffered when `drain` (nothing newer is waiting)."""
    if replay is not None:
        if not buffer or offset_of(buffer[-1]) < replay.last:
            return [], buffer
        size = sum(1 for m in buffer if offset_of(m) <= replay.last)
        return buffer[:size], buffer[size:]
    if len(buffer) >= max_messages or drain:
        return buffer[:max_messages], buffer[max_messages:]
    return [], buffer


class CheckpointStore:
    def __init__(self, clickhouse: ClickHouse, database: str, projection: str) -> None:
        self.ch = clickhouse
        self.table = f"{ident(database)}.checkpoints"
        self.database = database
        self.projection = projection

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.database))
        self.ch.execute(
            topology.create_table(
                self.table,
                ["`projection` String", "topic String", "`partition` Int32",
                 "first_offset Int64", "last_offset Int64", "state LowCardinality(String)",
                 "version UInt64", "recorded_at DateTime64(3) DEFAULT now64(3)"],
                "ReplacingMergeTree", "version", "(`projection`, topic, `partition`)",
                deduplicate=False,  # re-recording is idempotent by version, never dropped
            )
        )  # fmt: skip

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
        sync = self.ch.topology.sync_replica(self.table)
        if sync is not None:
            self.ch.execute(sync)
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

    def assign(self, partitions: list[tuple[str, int]]) -> list[Resume]:
        """Steps A to C for newly assigned partitions: where each one resumes."""
        # A. afresh: another member may have applied these partitions since we last looked
        fresh = self.store.load(partitions)
        resumes = []
        for topic, partition in partitions:
            checkpoint = fresh.get((topic, partition))
            if checkpoint is None:
                self.checkpoints.pop((topic, partition), None)
                resumes.append(Resume(topic, partition, 0, None))  # B. from the beginning
                continue
            self.checkpoints[(topic, partition)] = checkpoint
            # B. at the intent's first offset, or after the done batch; C. replay the intent
            replay = (
                BatchRange(topic, partition, checkpoint.first, checkpoint.last)
                if checkpoint.state == INTENT
                else None
            )
            resumes.append(Resume(topic, partition, checkpoint.resume_offset, replay))
        return resumes

    def resume_offset(self, topic: str, partition: int) -> int | None:
        checkpoint = self.checkpoints.get((topic, partition))
        return None if checkpoint is None else checkpoint.resume_offset

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


def acknowledge(consumer: Consumer, batch: BatchRange) -> None:
    """5. Tell the consumer group the batch is applied (a convenience for lag tools: resuming
    reads the checkpoint table, step B)."""
    consumer.commit(
        offsets=[TopicPartition(batch.topic, batch.partition, batch.last + 1)], asynchronous=True
    )
