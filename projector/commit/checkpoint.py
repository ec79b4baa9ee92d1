"""The commit protocol: how a batch becomes an exactly-once effect in ClickHouse.

Kafka delivers at least once; this module makes the *effect* exactly once. The whole protocol is
here, in the order it runs.

When partitions are assigned, `BatchCommitter.assign` will:

  A. claim them: record, per partition, a new ownership generation (one more than the newest)
     under this member's id in the owners table, *then* read their checkpoints afresh from
     ClickHouse (another member of the group may have applied them since this one last looked; a
     cached checkpoint would apply its batches twice);
  B. position each partition where the checkpoint says: at an open intent's first offset, after
     the last done batch, or at the beginning — the checkpoint table, not the consumer group's
     committed offsets, is the truth;
  C. mark a partition whose last record is an intent for exact replay: `cut_batch` then cuts
     exactly that range again, so the replay sends the same tokens.

For every batch of one topic-partition, `BatchCommitter.commit` will:

  1. check the batch is the next one: it starts after the last applied offset (Kafka offsets may
     have gaps, never overlaps), or it is exactly the open intent being replayed;
  2. check the partition is still ours (the fence, below), then record the intent (projection,
     topic, partition, first and last offset, our generation) in the checkpoint table, *before*
     touching any target table;
  3. run the apply function, which inserts with deduplication tokens derived from
     (projection, target table, topic, partition, first, last, chunk): a replay of the same range
     sends the same tokens, and ClickHouse drops inserts it has already seen. Every statement it
     runs through the fenced ClickHouse (`fenced`) first checks the partition is still ours;
  4. check the partition is still ours, then record the batch as done.

And afterwards, `acknowledge` will:

  5. commit the Kafka offset after the batch, only as a convenience for lag tools (step B never
     reads it).

`projector reset` moves a partition to another offset (projector/operations/offset_reset.py), while the
member holding it holds the table paused (no batch in flight, no open intent). `reset_to` will:

  R1. claim the partition (A), one generation above every claim: the holder's batches would now
      fail the fence, and its own re-claim, which the runner makes before it resumes the table,
      is newer still;
  R2. log the move (previous resume offset, new offset) in `partition_resets`. The transaction
      ledger must count each event once, and events re-read after a reset back were counted
      when they were first applied: `counted_ranges` turns the log into the offsets already
      counted; the runner cuts batches at their edges and records no ledger progress for a
      batch inside them. Logged before R3: a crash in between leaves a logged move that did not
      happen, which (for a move back) claims no offset counted that was not, and the command,
      run again, logs the same move again;
  R3. record a `reset` checkpoint at the new offset under the claim of R1. It wins over every
      record before it (an older generation), so steps B and 1 read it like a done batch ending
      just before the offset: the partition resumes there, and the next batch must start at it
      or after it.

The fence: a member's own view of its assignment can be stale (ClickHouse stalled past
`max.poll.interval.ms`, and the group gave its partitions to another member meanwhile), so the
owners table in ClickHouse decides. "Still ours" = the partition's newest claim is the one this
member made at A. Why that is enough (docs/projector.md, "Scale-out", has the long form):
  - every write of a batch (step 3) happens after a check that passed, which ran after the batch's
    intent was recorded (step 2). So if a write lands at all, the intent landed before any newer
    claim, and the newer owner — who claims (A) before reading checkpoints — reads that intent
    and replays exactly its range under the same tokens: the stale write is a duplicate ClickHouse
    drops (or an identical row);
  - a stale member's records that land after a newer claim (an intent checked just before it)
    never count: checkpoint rows are ordered by (generation, offsets), so the newer owner's
    records win over them, whatever their offsets.

Checkpoint rows are versioned (`generation`, then `last_offset * 2 + done`) in a
ReplacingMergeTree, so the newest record per (projection, topic, partition) wins and re-recording
the same state is harmless.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import Consumer, TopicPartition

from projector.clickhouse import ClickHouse, Topology, ident, insert_statement, quote
from projector.errors import CheckpointError, IntentGone, PartitionLost

# The projection of the replica tables' checkpoints: part of every checkpoint key and token.
PROJECTION = "replica"
M = TypeVar("M")

INTENT = "intent"
DONE = "done"
RESET = "reset"  # `projector reset`: resume at `first` (recorded with last = first - 1)


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
class Claim:
    """A member's claim on a partition (step A): the newest claim owns it."""

    generation: int
    member: str


@dataclass(frozen=True)
class PartitionCheckpoint:
    state: str
    first: int
    last: int
    generation: int = field(default=0, compare=False)  # the claim it was recorded under

    @property
    def resume_offset(self) -> int:
        """Where consumption continues: the intent's first offset, or after the done batch (a
        reset's last offset is the one before where it resumes)."""
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
    until the buffer reaches the intent's last offset (`IntentGone` when Kafka no longer holds
    its first offset: nothing could replay it). Otherwise a batch is `max_messages` messages, or
    whatever is buffered when `drain` (nothing newer is waiting)."""
    if replay is not None:
        if buffer and offset_of(buffer[0]) > replay.first:
            gone = (replay.topic, replay.partition, replay.first, replay.last)
            raise IntentGone(*gone, offset_of(buffer[0]))
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
        self.owners = f"{ident(database)}.partition_owners"
        self.resets = f"{ident(database)}.partition_resets"
        self.database = database
        self.projection = projection

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.database))
        unfenced = f"{ident(self.database)}.checkpoints_unfenced"
        columns = self._columns("checkpoints")
        if columns and "generation" not in columns:  # written before the fence: migrate below
            self.ch.execute(f"RENAME TABLE {self.table} TO {unfenced}{topology.on_cluster()}")
        self.ch.execute(
            topology.create_table(
                self.table,
                [
                    "`projection` String",
                    "topic String",
                    "`partition` Int32",
                    "first_offset Int64",
                    "last_offset Int64",
                    "state LowCardinality(String)",
                    "version UInt64",
                    "generation UInt64 DEFAULT 0",
                    # The newest record wins: a newer owner's (generation) over a stale member's,
                    # then the later state of one owner (version).
                    "ordering UInt128 MATERIALIZED bitShiftLeft(toUInt128(generation), 64) + version",
                    "recorded_at DateTime64(3) DEFAULT now64(3)",
                ],
                "ReplacingMergeTree",
                "ordering",
                "(`projection`, topic, `partition`)",
                deduplicate=False,  # re-recording is idempotent by version, never dropped
            )
        )
        if self._columns("checkpoints_unfenced"):  # idempotent: re-run after a crash mid-way
            kept = "`projection`, topic, `partition`, first_offset, last_offset, state, version"
            self.ch.execute(f"INSERT INTO {self.table} ({kept}) SELECT {kept} FROM {unfenced}")
            self.ch.execute(f"DROP TABLE {unfenced}{topology.on_cluster()}")
        self.ch.execute(
            topology.create_table(
                self.owners,
                [
                    "`projection` String",
                    "topic String",
                    "`partition` Int32",
                    "generation UInt64",
                    "member String",
                    "claimed_at DateTime64(3) DEFAULT now64(3)",
                ],
                "ReplacingMergeTree",
                "generation",
                "(`projection`, topic, `partition`)",
                deduplicate=False,  # every claim must land
            )
        )
        self.ch.execute(
            topology.create_table(
                self.resets,
                [
                    "`projection` String",
                    "topic String",
                    "`partition` Int32",
                    "generation UInt64",
                    "previous Int64",
                    "`offset` Int64",
                    "member String",
                    "reset_at DateTime64(3) DEFAULT now64(3)",
                ],
                "ReplacingMergeTree",
                "",
                "(`projection`, topic, `partition`, generation)",
                deduplicate=False,  # every reset must land
            )
        )

    def _columns(self, table: str) -> set[str]:
        rows = self.ch.rows(
            f"SELECT name FROM system.columns WHERE database = {quote(self.database)} "
            f"AND table = {quote(table)}"
        )
        return {r["name"] for r in rows}

    def _where(self, partitions: list[tuple[str, int]] | None) -> str:
        where = f"`projection` = {quote(self.projection)}"
        if partitions is not None:
            wanted = ", ".join(f"({quote(t)}, {int(p)})" for t, p in partitions)
            where += f" AND (topic, `partition`) IN ({wanted})"
        return where

    def _sync(self, table: str) -> None:
        """Another member wrote `table` through another replica, maybe: fetch its parts first."""
        sync = self.ch.topology.sync_replica(table)
        if sync is not None:
            self.ch.execute(sync)

    def load(
        self, partitions: list[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], PartitionCheckpoint]:
        """The newest record of every partition (or of the given ones)."""
        if partitions is not None and not partitions:
            return {}
        self._sync(self.table)
        rows = self.ch.rows(
            f"SELECT topic, partition, first_offset, last_offset, state, generation "
            f"FROM {self.table} FINAL WHERE {self._where(partitions)}"
        )
        return {
            (r["topic"], int(r["partition"])): PartitionCheckpoint(
                r["state"], int(r["first_offset"]), int(r["last_offset"]), int(r["generation"])
            )
            for r in rows
        }

    def record(self, batch: BatchRange, state: str, generation: int = 0) -> None:
        version = batch.last * 2 + (1 if state == DONE else 0)
        row = {
            "projection": self.projection,
            "topic": batch.topic,
            "partition": batch.partition,
            "first_offset": batch.first,
            "last_offset": batch.last,
            "state": state,
            "version": version,
            "generation": generation,
        }
        # No dedup token: re-recording is idempotent by version, and must not be dropped.
        self.ch.execute(
            insert_statement(
                self.table, list(row), [row], token=f"cp|{batch.token(self.projection, state)}"
            )
        )

    def reset_to(
        self, topic: str, partition: int, offset: int, previous: int, member: str
    ) -> Claim:
        """R1-R3: the partition resumes at `offset` for whoever claims it next (the module
        docstring); `previous` is where it would have resumed. Call while its holder keeps it
        paused; the claim made is returned."""
        if offset < 0:
            raise CheckpointError(f"cannot reset {topic}[{partition}] to offset {offset}")
        (claimed,) = self.claim([(topic, partition)], member).values()  # R1.
        token = f"cp|reset|{topic}|{partition}|{claimed.generation}"
        logged = {  # R2. (previous: where it would have resumed; 0 if it never applied any)
            "projection": self.projection,
            "topic": topic,
            "partition": partition,
            "generation": claimed.generation,
            "previous": previous,
            "offset": offset,
            "member": member,
        }
        self.ch.execute(insert_statement(self.resets, list(logged), [logged], token=token))
        row = {  # R3. sorted like a done batch ending at offset - 1 (`record`)
            "projection": self.projection,
            "topic": topic,
            "partition": partition,
            "first_offset": offset,
            "last_offset": offset - 1,
            "state": RESET,
            "version": max(0, offset * 2 - 1),
            "generation": claimed.generation,
        }
        self.ch.execute(insert_statement(self.table, list(row), [row], token=token))
        return claimed

    def reset_history(
        self, partitions: list[tuple[str, int]]
    ) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """Each partition's resets in order: (previous resume offset, new offset)."""
        if not partitions:
            return {}
        self._sync(self.resets)
        rows = self.ch.rows(
            f"SELECT topic, partition, previous, offset FROM {self.resets} FINAL "
            f"WHERE {self._where(partitions)} ORDER BY generation"
        )
        history: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for r in rows:
            key = (r["topic"], int(r["partition"]))
            history.setdefault(key, []).append((int(r["previous"]), int(r["offset"])))
        return history

    def restart_at(self, topic: str, ends: dict[int, int], member: str) -> None:
        """Every partition of `topic` resumes at its offset in `ends` (a table's rebuild: nothing
        before those offsets is applied again). The topic's records go, then a claim above every
        member's and a done record before each end: a member that claims next reads them."""
        for table in (self.table, self.resets):  # the old topic's offsets mean nothing now
            self.ch.execute(
                f"DELETE FROM {table} WHERE {self._where(None)} AND topic = {quote(topic)}"
            )
        claimed = self.claim([(topic, partition) for partition in ends], member)
        for partition, end in ends.items():
            if end > 0:
                batch = BatchRange(topic, partition, end - 1, end - 1)
                self.record(batch, DONE, claimed[(topic, partition)].generation)

    def claims(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], Claim]:
        """The newest claim of each of these partitions (the owner, as far as the fence goes)."""
        if not partitions:
            return {}
        self._sync(self.owners)
        rows = self.ch.rows(
            f"SELECT topic, partition, generation, member FROM {self.owners} FINAL "
            f"WHERE {self._where(partitions)}"
        )
        return {
            (r["topic"], int(r["partition"])): Claim(int(r["generation"]), r["member"])
            for r in rows
        }

    def claim(self, partitions: list[tuple[str, int]], member: str) -> dict[tuple[str, int], Claim]:
        """A. A new claim on each partition: one generation above its newest claim."""
        if not partitions:
            return {}
        newest = self.claims(partitions)
        claimed = {
            (t, p): Claim((newest[(t, p)].generation if (t, p) in newest else 0) + 1, member)
            for t, p in partitions
        }
        rows = [
            {
                "projection": self.projection,
                "topic": t,
                "partition": p,
                "generation": c.generation,
                "member": c.member,
            }
            for (t, p), c in claimed.items()
        ]
        self.ch.execute(insert_statement(self.owners, list(rows[0]), rows, token=f"claim|{member}"))
        return claimed


def counted_ranges(history: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """R3: from a partition's resets in order, (previous resume offset, new offset), the offset
    ranges [first, end) whose events the transaction ledger has counted already. Between two
    resets the partition applied (and counted) from the first one's new offset up to the second
    one's previous offset; before the first reset, from the beginning. The ranges are merged
    and sorted."""
    ranges, start = [], 0
    for previous, offset in history:
        if previous > start:
            ranges.append((start, previous))
        start = offset
    merged: list[tuple[int, int]] = []
    for first, end in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((first, end))
    return merged


def counted_run(ranges: Sequence[tuple[int, int]], offset: int) -> tuple[bool, int | None]:
    """Whether the event at `offset` was counted already (`counted_ranges`), and the offset where
    that stops being so (None: never): a batch starting at `offset` must end before it."""
    for first, end in ranges:
        if offset < first:
            return False, first
        if offset < end:
            return True, end
    return False, None


def member_id() -> str:
    """This process, as its claims name it (host, pid and a random part: unique per run)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class BatchCommitter:
    """Applies batches under the protocol above and tracks each partition's resume offset."""

    def __init__(self, store: CheckpointStore, member: str | None = None) -> None:
        self.store = store
        self.member = member or member_id()
        self.checkpoints = store.load()
        self.claims: dict[tuple[str, int], Claim] = {}  # ours, from step A
        self._committing = threading.local()  # the batch `commit` runs on this thread, if any

    def assign(self, partitions: list[tuple[str, int]]) -> list[Resume]:
        """Steps A to C for newly assigned partitions: where each one resumes."""
        # A. claim first, then read afresh: a stale member's intent that landed before our claim
        # is seen here (and replayed exactly); its writes after our claim fail their checks
        self.claims.update(self.store.claim(partitions, self.member))
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

    def release(self, partitions: list[tuple[str, int]]) -> None:
        """Forget our claims on partitions Kafka took away (a newer claim supersedes them)."""
        for key in partitions:
            self.claims.pop(key, None)

    def forget_checkpoint(self, topic: str, partition: int) -> None:
        """Step 1 judges the next batch against nothing: the partition's topic was re-created,
        and the checkpoint describes offsets of the old one (our records, at this claim's newer
        generation, win over its records from now on)."""
        self.checkpoints.pop((topic, partition), None)

    def resume_offset(self, topic: str, partition: int) -> int | None:
        checkpoint = self.checkpoints.get((topic, partition))
        return None if checkpoint is None else checkpoint.resume_offset

    def check_ownership(self, topic: str, partition: int, ours: Claim | None = None) -> None:
        """The fence: the partition's newest claim must be ours (`ours`, or our current claim),
        else `PartitionLost`."""
        if ours is None:
            ours = self.claims.get((topic, partition))
        newest = self.store.claims([(topic, partition)]).get((topic, partition))
        if ours is None or newest != ours:
            raise PartitionLost(topic, partition, ours, newest)

    def commit(
        self, batch: BatchRange, apply: Callable[[BatchRange], None], claim: Claim | None = None
    ) -> None:
        """Steps 1-4 for `batch`; under `claim`, the one it was cut under (the run loop reads
        ahead), or not at all: a batch cut before a re-claim is refused like a stale member's."""
        ours = self.claims.get((batch.topic, batch.partition))
        if claim is not None and ours != claim:
            raise PartitionLost(batch.topic, batch.partition, claim, ours)
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
            if previous.state in (DONE, RESET) and batch.first <= previous.last:
                raise CheckpointError(
                    f"batch {batch.first}-{batch.last} on {batch.topic}[{batch.partition}] overlaps "
                    f"the last applied offset {previous.last}"
                )
        # 2. still ours? then the intent, before any effect
        self.check_ownership(batch.topic, batch.partition, ours)
        assert ours is not None  # the check passed
        generation = ours.generation
        self.store.record(batch, INTENT, generation)
        self.checkpoints[(batch.topic, batch.partition)] = PartitionCheckpoint(
            INTENT, batch.first, batch.last
        )
        # 3. effects, deduplicated by tokens derived from the batch; every statement through
        # `fenced` checks the partition is still ours first (the invariant in the docstring)
        with self._fencing(batch, ours):
            apply(batch)
        # 4. still ours? then done
        self.check_ownership(batch.topic, batch.partition, ours)
        self.store.record(batch, DONE, generation)
        self.checkpoints[(batch.topic, batch.partition)] = PartitionCheckpoint(
            DONE, batch.first, batch.last
        )

    @contextmanager
    def _fencing(self, batch: BatchRange, claim: Claim) -> Iterator[None]:
        self._committing.batch, self._committing.claim = batch, claim
        try:
            yield
        finally:
            self._committing.batch = self._committing.claim = None

    def check_fence(self) -> None:
        """Step 3's check, before a statement of the batch this thread is committing (none: no
        check — the main thread's own statements are not a batch's)."""
        batch: BatchRange | None = getattr(self._committing, "batch", None)
        if batch is not None:
            self.check_ownership(batch.topic, batch.partition, self._committing.claim)

    def fenced(self, clickhouse: ClickHouse) -> FencedClickHouse:
        """`clickhouse` for everything a batch's apply function writes with (step 3)."""
        return FencedClickHouse(clickhouse, self.check_fence)


class FencedClickHouse:
    """A ClickHouse whose statements, while a batch is committed on the calling thread, each run
    after the fence check (`BatchCommitter.check_fence`); reads and everything else pass through."""

    def __init__(self, clickhouse: ClickHouse, check: Callable[[], None]) -> None:
        self._clickhouse = clickhouse
        self._check = check
        self.topology: Topology = clickhouse.topology

    def execute(self, sql: str) -> None:
        self._check()
        self._clickhouse.execute(sql)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return self._clickhouse.rows(sql)

    def text(self, sql: str, fmt: str) -> str:
        return self._clickhouse.text(sql, fmt)

    def over_avro(self, sql: str, *args: Any, **kwargs: Any) -> str:
        self._check()
        return self._clickhouse.over_avro(sql, *args, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clickhouse, name)


def acknowledge(consumer: Consumer, batch: BatchRange) -> None:
    """5. Tell the consumer group the batch is applied (a convenience for lag tools: resuming
    reads the checkpoint table, step B)."""
    consumer.commit(
        offsets=[TopicPartition(batch.topic, batch.partition, batch.last + 1)], asynchronous=True
    )
