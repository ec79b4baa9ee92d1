"""Ghost rows after a Debezium re-snapshot: the keys a snapshot did not read are deleted.

When Debezium snapshots a table again (its replication slot was lost, its offsets were reset, a
blocking snapshot was asked for), the keys deleted while it was not capturing get no delete
event: their rows would stay in the replica as *ghosts*. A snapshot marks its reads of a table
in `source.snapshot` (seen from Debezium 3.6 on the stack, for an initial snapshot after an
offsets reset, `snapshot.mode = when_needed` after a lost slot, and a blocking snapshot asked
for through the signal table alike): the first read of the snapshot's
first table `first`, of every other table `first_in_data_collection`, then `true`, and the last
read of a table `last_in_data_collection` (`last` for the snapshot's last table). A table of one
row gets only the last mark; an empty table gets no event at all.

For a table whose topic has one partition, `SnapshotSweep.after_batch` will, for every batch:

  1. find the batch's snapshot bounds: reads (`op = r`) marked first or last. Only messages whose
     bytes hold one of the marks as Avro writes it (`AVRO_MARKS`) are decoded, so a batch
     without a bound costs one byte search over its values;
  2. record them in `snapshot_bounds` under the batch's deduplication token (a replay records
     the same rows, and finds the same bounds later);
  3. for each last bound L: its snapshot's first read F is the newest first bound at or before
     L recorded after the previous last bound (none: the table had one row, F = L);
  4. insert, inside ClickHouse, a deletion marker for every key whose newest row is older than
     F and is not a deletion (`replica.insert_deletion_markers`, the truncate's markers too):
     version F, at offset L (so the read models' maintainer, which reads the rows a batch
     wrote by offset, sees them).

Why that is exact:
  - Debezium emits a snapshot before streaming resumes, and nothing else of the table comes in
    between: every key alive at the snapshot's point is read at an offset in [F, L], so its
    newest row is at F or later and it gets no marker. A key not read was gone from Postgres
    then: its newest row is older than F, and the marker deletes it.
  - The marker's version F is above every row it deletes and below every read of the snapshot:
    a read dead-lettered now and replayed later (`projector dlq replay`) still wins; a later
    re-insert of the key streams at an offset above L and wins too.
  - Replays: the bounds are recorded under the batch's token, and the lookup of F reads only
    bounds at or before L, all recorded by this batch or earlier ones. The markers carry no
    token, like a truncate's: they are identical rows (same key, version and content), and a
    replay may find fewer keys to mark (merges may have folded a ghost's rows into its marker),
    so numbered blocks of a replay could be dropped wrongly. A key marked once is not marked
    again (its newest row is then the marker, at F).

A topic of several partitions has the bounds of a table spread over them (each key's reads in
its own partition; F and L may be in different ones), and offsets of two partitions do not
order one key's events: not attempted. The first such bound of a table that follows older rows
logs a warning naming the table and the remedy (`projector table reset`).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.commit.checkpoint import BatchRange
from projector.errors import KafkaUnavailable, not_the_message
from projector.kafka import table_of
from projector.messages import RawMessage, message_columns
from projector.replicas.catalog import ReplicaTable, metadata
from projector.replicas.rows import insert_deletion_markers
from schemas.registry import SchemaCache

log = logging.getLogger("projector")

FIRST, LAST = "first", "last"
UNREADABLE = "unreadable"  # a message holding a mark's bytes that does not decode
# `source.snapshot` values that bound one table's reads in a snapshot.
SNAPSHOT_MARKS: dict[str, str] = {
    "first": FIRST,
    "first_in_data_collection": FIRST,
    "last_in_data_collection": LAST,
    "last": LAST,
}


def avro_string(text: str) -> bytes:
    """`text` as Avro encodes a string: its length as a zig-zag varint, then its UTF-8 bytes."""
    data = text.encode()
    length, encoded = len(data) << 1, bytearray()  # zig-zag of a non-negative number
    while length > 0x7F:
        encoded.append((length & 0x7F) | 0x80)
        length >>= 7
    encoded.append(length)
    return bytes(encoded) + data


# The marks as they appear inside a message value (`source.snapshot` is an Avro string): a
# message without any of these bytes is no bound and is not decoded.
AVRO_MARKS = tuple(avro_string(mark) for mark in SNAPSHOT_MARKS)


@dataclass(frozen=True)
class SnapshotBound:
    """A read that begins or ends a table's part of a Debezium snapshot."""

    offset: int
    kind: str  # FIRST or LAST
    source: dict[str, Any]  # the read's `source` block: its LSN and time go on the markers


def snapshot_bounds(
    messages: Sequence[RawMessage],
    decode: Callable[[bytes], Any],
    joined: Sequence[bytes] | None = None,
) -> list[SnapshotBound]:
    """The snapshot bounds among `messages` (step 1), in offset order; `decode` reads a message
    value's datum, `joined` are the values already concatenated (the fast path's segments). A
    message that holds a mark's bytes and does not decode (the apply path dead-letters it) is an
    `UNREADABLE` bound: it may be a snapshot's first read, and sweeping without it would start
    from the wrong offset (`SnapshotSweep.after_batch` stops the table instead)."""
    if joined is None:
        values = message_columns(messages)[2]  # no per-message tuples: the fast path's way
        joined = [b"".join([v for v in values if v is not None])]
    # The marks are searched in the batch's bytes in C; only the messages holding one are looked
    # at (found by where they lie in those bytes), not every message of a batch that has one.
    found, base = [], 0
    for data in joined:
        for mark in AVRO_MARKS:
            at = data.find(mark)
            while at != -1:
                found.append(base + at)
                at = data.find(mark, at + 1)
        base += len(data)
    if not found:
        return []
    offsets, _, values = message_columns(messages)
    present = [(o, v) for o, v in zip(offsets, values, strict=True) if v is not None]
    ends = list(accumulate(len(v) for _, v in present))  # where each value ends in the bytes
    holding = sorted({bisect_right(ends, at) for at in found})  # a mark across two: a miss
    bounds = []
    for index in holding:
        offset, value = present[index]
        if not any(mark in value for mark in AVRO_MARKS):
            continue
        try:
            event = decode(value)
        except Exception as exc:
            if not_the_message(exc) is not None:
                raise  # the registry away: the batch is tried again
            bounds.append(SnapshotBound(offset, UNREADABLE, {}))
            continue
        if not isinstance(event, dict) or event.get("op") != "r":
            continue
        source = event.get("source") or {}
        kind = SNAPSHOT_MARKS.get(str(source.get("snapshot")))
        if kind is not None:
            bounds.append(SnapshotBound(offset, kind, source))
    return bounds


class SnapshotSweep:
    def __init__(
        self,
        ch: ClickHouse,
        database: str,
        projection: str,
        partitions: Callable[[str], int | None],
    ) -> None:
        """`partitions(topic)`: the topic's partition count (None: Kafka cannot say now)."""
        self.ch = ch
        self.database = database
        self.table = f"{ident(database)}.snapshot_bounds"
        self.projection = projection
        self.partitions = partitions
        self._warned: set[str] = set()

    def create(self) -> None:
        self.ch.execute(self.ch.topology.create_database(self.database))
        self.ch.execute(
            self.ch.topology.create_table(
                self.table,
                [
                    "`projection` String",
                    "topic String",
                    "`partition` Int32",
                    "`offset` Int64",
                    "kind LowCardinality(String)",
                    "recorded_at DateTime64(3) DEFAULT now64(3)",
                ],
                "ReplacingMergeTree",
                "",
                "(`projection`, topic, `partition`, `offset`)",
            )
        )

    def after_batch(
        self,
        batch: BatchRange,
        messages: Sequence[RawMessage],
        replica: ReplicaTable | None,
        schemas: SchemaCache,
        joined: Sequence[bytes] | None = None,
    ) -> str | None:
        """Steps 1-4 for a batch whose rows are all written (before the read models are kept);
        `joined`: its message values, already concatenated. Returns why the table must stop
        instead (a bound that does not decode: which keys a snapshot read cannot be known), or
        None."""
        if replica is None or replica.append_only:
            return None  # nothing stored, or a history: a re-read appends, nothing is replaced
        bounds = snapshot_bounds(messages, lambda value: schemas.decode(value)[1], joined)  # 1.
        if not bounds:
            return None
        count = self.partitions(batch.topic)
        if count is None:
            raise KafkaUnavailable(f"cannot learn the partition count of {batch.topic}")
        unreadable = [b.offset for b in bounds if b.kind == UNREADABLE]
        if unreadable and count == 1:  # (a topic of several partitions is never swept: below)
            return (
                f"the message at offset {unreadable[0]} of {batch.topic}[{batch.partition}] may "
                "bound a Debezium snapshot of the table but does not decode (it is in the DLQ): "
                "the keys the snapshot did not read cannot be told, so none is marked deleted"
            )
        bounds = [b for b in bounds if b.kind != UNREADABLE]
        if not bounds:
            return None
        table = table_of(batch.topic)
        if count > 1:
            self._warn_partitioned(batch, replica, bounds[0], table, count)
            return None
        rows = [
            {
                "projection": self.projection,
                "topic": batch.topic,
                "partition": batch.partition,
                "offset": b.offset,
                "kind": b.kind,
            }
            for b in bounds
        ]
        token = batch.token(self.projection, self.table, "bounds")
        self.ch.execute(insert_statement(self.table, list(rows[0]), rows, token))  # 2.
        for bound in bounds:
            if bound.kind == LAST:
                self._sweep(batch, replica, bound, table)
        return None

    def _sweep(
        self, batch: BatchRange, replica: ReplicaTable, last: SnapshotBound, table: str
    ) -> None:
        first = self._first_read(batch, last.offset)  # 3.
        if not self._rows_before(replica, batch.partition, first):
            return  # the table's first snapshot, or nothing left to mark
        marker = metadata("d", last.source, batch.partition, last.offset)
        marker["_version"] = first  # above every row it deletes, below every read (docstring)
        insert_deletion_markers(self.ch, replica, marker, below=first, live_only=True)  # 4.
        swept = self.ch.rows(
            f"SELECT count() AS n FROM {replica.qualified} WHERE _partition = {batch.partition} "
            f"AND _offset = {last.offset} AND _is_deleted = 1"
        )
        log.info(
            "%s: Debezium snapshotted the table again (reads %d-%d of %s[%d]): %d key(s) "
            "it did not read were deleted meanwhile and are marked deleted",
            table,
            first,
            last.offset,
            batch.topic,
            batch.partition,
            int(swept[0]["n"]),
        )

    def _first_read(self, batch: BatchRange, last: int) -> int:
        """Step 3: the offset of the first read of the snapshot that ends at `last`."""
        sync = self.ch.topology.sync_replica(self.table)
        if sync is not None:
            self.ch.execute(sync)
        found = self.ch.rows(
            f"SELECT max(if(kind = {quote(FIRST)}, `offset`, -1)) AS first, "
            f"max(if(kind = {quote(LAST)} AND `offset` < {last}, `offset`, -1)) AS previous_last "
            f"FROM {self.table} WHERE `projection` = {quote(self.projection)} "
            f"AND topic = {quote(batch.topic)} AND `partition` = {batch.partition} "
            f"AND `offset` <= {last}"
        )
        first, previous_last = int(found[0]["first"]), int(found[0]["previous_last"])
        return first if first > previous_last else last

    def _rows_before(self, replica: ReplicaTable, partition: int, offset: int) -> bool:
        """Whether the replica holds a row of `partition` written before `offset` (found through
        the (_partition, _offset) index: a first snapshot of a big table costs nothing)."""
        found = self.ch.rows(
            f"SELECT 1 AS found FROM {replica.qualified} WHERE _partition = {partition} "
            f"AND _offset < {offset} LIMIT 1"
        )
        return bool(found)

    def _warn_partitioned(
        self, batch: BatchRange, replica: ReplicaTable, bound: SnapshotBound, table: str, count: int
    ) -> None:
        if table in self._warned or not self._rows_before(replica, batch.partition, bound.offset):
            return
        self._warned.add(table)
        log.warning(
            "%s: Debezium snapshotted the table again (%s[%d]@%d), and its topic has %d "
            "partitions: rows of keys deleted while it was not captured may remain in "
            "the replica (ghost rows; removed automatically only with one partition). "
            "Rebuild the table with `projector table reset %s` (docs/troubleshooting.md)",
            table,
            batch.topic,
            batch.partition,
            bound.offset,
            count,
            table,
        )

    def forget(self, topic: str) -> None:
        """A table's rebuild: the topic's bounds describe offsets it will not apply again."""
        self.ch.execute(
            f"DELETE FROM {self.table} WHERE `projection` = {quote(self.projection)} "
            f"AND topic = {quote(topic)}"
        )
