"""The ghost-row sweep after a Debezium re-snapshot (projector/replicas/snapshot_sweep.py), on the real
embedded engine (chDB in this process): the replica rows are written as the apply paths write
them, and the batches' messages are stand-ins whose values carry the snapshot marks as Avro
encodes them (the real stack's events: tests/integration/test_resnapshot_ghosts.py)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import fastavro
import pytest

from projector.clickhouse import ChdbBackend
from projector.commit.checkpoint import BatchRange
from projector.messages import RawMessage
from projector.replicas.catalog import ReplicaCatalog, ReplicaTable, SourceColumn, metadata
from projector.replicas.rows import insert_rows
from projector.replicas.snapshot_sweep import (
    AVRO_MARKS,
    SNAPSHOT_MARKS,
    SnapshotSweep,
    avro_string,
    snapshot_bounds,
)
from schemas.errors import RegistryUnavailable, UnknownSchema
from schemas.type_map import column_type

TOPIC = "cdc.public.items"

# The `source.snapshot` field as Debezium 3.6 registers it (seen in the stack's registry).
SOURCE_SCHEMA = {
    "type": "record",
    "name": "Envelope",
    "fields": [
        {"name": "op", "type": "string"},
        {
            "name": "source",
            "type": {
                "type": "record",
                "name": "Source",
                "fields": [
                    {
                        "name": "snapshot",
                        "type": [
                            {"type": "string", "connect.name": "io.debezium.data.Enum"},
                            "null",
                        ],
                        "default": "false",
                    },
                    {"name": "lsn", "type": ["null", "long"], "default": None},
                ],
            },
        },
    ],
}


def encoded(op: str, snapshot: str | None) -> bytes:
    out = io.BytesIO()
    record = {"op": op, "source": {"snapshot": snapshot, "lsn": 7}}
    fastavro.schemaless_writer(out, fastavro.parse_schema(SOURCE_SCHEMA), record)
    return out.getvalue()


def decoded(value: bytes) -> Any:
    return fastavro.schemaless_reader(io.BytesIO(value), fastavro.parse_schema(SOURCE_SCHEMA))


def test_only_reads_marked_first_or_last_are_bounds() -> None:
    values = [
        encoded("r", "first"),
        encoded("r", "true"),
        encoded("r", "last_in_data_collection"),
        encoded("r", "incremental"),
        encoded("c", None),
        encoded("r", "first_in_data_collection"),
        encoded("u", "false"),
        encoded("r", "last"),
        None,
    ]
    messages = [RawMessage(TOPIC, 0, offset, b"k", v) for offset, v in enumerate(values)]
    bounds = snapshot_bounds(messages, decoded)
    assert [(b.offset, b.kind) for b in bounds] == [
        (0, "first"),
        (2, "last"),
        (5, "first"),
        (7, "last"),
    ]


def test_bounds_are_found_in_the_fast_paths_segments_too() -> None:
    """The fast path hands its segments' bytes (the values without tombstones, in order, cut
    anywhere): each mark is traced back to the message that holds it."""
    values: list[bytes | None] = [encoded("r", "true") for _ in range(40)]
    values[3] = values[17] = None  # tombstones
    values[4] = encoded("r", "first")
    values[25] = encoded("r", "last_in_data_collection")
    values[39] = encoded("r", "last")
    messages = [RawMessage(TOPIC, 0, 100 + i, b"k", v) for i, v in enumerate(values)]
    present = [v for v in values if v is not None]
    segments = [b"".join(present[:10]), b"".join(present[10:30]), b"".join(present[30:])]
    expected = [(104, "first"), (125, "last"), (139, "last")]
    for joined in (segments, None):
        bounds = snapshot_bounds(messages, decoded, joined)
        assert [(b.offset, b.kind) for b in bounds] == expected


@pytest.mark.parametrize("mark", sorted(SNAPSHOT_MARKS))
def test_the_byte_search_finds_every_mark_as_avro_writes_it(mark: str) -> None:
    assert any(bytes_ in encoded("r", mark) for bytes_ in AVRO_MARKS)


@pytest.mark.parametrize("value", ["true", "false", "incremental", "firstly", "at last"])
def test_the_byte_search_skips_other_values(value: str) -> None:
    assert not any(bytes_ in encoded("r", value) for bytes_ in AVRO_MARKS)


BROKEN = b"\x00\x00\x0f\x42\x3f"  # Confluent framing with a schema id the registry lacks


class Schemas:
    """What the sweep asks of the schema cache: a value's datum (a `BROKEN` one: unknown)."""

    def decode(self, value: bytes) -> tuple[None, Any]:
        if value.startswith(BROKEN):
            raise UnknownSchema("schema 999999 is not in the registry")
        return None, decoded(value)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(str(tmp_path_factory.mktemp("chdb")))
    yield backend
    backend.close()


class Table:
    """A keyed replica and its topic's batches, written as the apply paths write them."""

    def __init__(self, engine: ChdbBackend, name: str, partitions: int = 1) -> None:
        self.ch = engine
        columns = [
            SourceColumn("id", column_type("int")),
            SourceColumn("v", column_type(["null", "string"])),
        ]
        self.replica: ReplicaTable = ReplicaCatalog(engine, "replica_").ensure(
            "public", name, ["id"], columns
        )
        self.topic = f"cdc.public.{name}"
        self.sweep = SnapshotSweep(engine, "projector", "replica", lambda _: partitions)
        self.sweep.create()
        self.offset = 0

    def batch(self, *events: tuple[str, int, str | None]) -> BatchRange:
        """Apply events (op, id, snapshot mark) at the next offsets; returns the batch."""
        first = self.offset
        messages, rows = [], []
        for op, key, mark in events:
            if op == "broken":  # a read that does not decode: the apply path dead-letters it
                value = BROKEN + avro_string(mark or "")
                messages.append(RawMessage(self.topic, 0, self.offset, b"k", value))
                self.offset += 1
                continue
            messages.append(RawMessage(self.topic, 0, self.offset, b"k", encoded(op, mark)))
            row = {"id": key, **metadata(op, {"lsn": 7}, 0, self.offset)}
            rows.append(row if op == "d" else {**row, "v": f"{op}@{self.offset}"})
            self.offset += 1
        batch = BatchRange(self.topic, 0, first, self.offset - 1)
        insert_rows(self.ch, self.replica, rows, batch.token("replica", self.replica.qualified))
        self.stopped = self.sweep.after_batch(batch, messages, self.replica, Schemas())  # type: ignore[arg-type]
        self.messages = messages
        return batch

    def replay(self, batch: BatchRange) -> None:
        self.sweep.after_batch(batch, self.messages, self.replica, Schemas())  # type: ignore[arg-type]

    def live(self) -> dict[int, str]:
        rows = self.ch.rows(f"SELECT id, v FROM {self.replica.qualified} FINAL ORDER BY id")
        return {int(r["id"]): r["v"] for r in rows}

    def markers(self) -> list[tuple[int, int, int]]:
        """(key, _version, _offset) of every stored deletion marker."""
        rows = self.ch.rows(
            f"SELECT id, _version, _offset FROM {self.replica.qualified} WHERE _is_deleted = 1 "
            "ORDER BY id, _version"
        )
        return [(int(r["id"]), int(r["_version"]), int(r["_offset"])) for r in rows]


def snapshot(keys: list[int]) -> list[tuple[str, int, str | None]]:
    """A table's part of a snapshot: its reads, first and last marked (one read: last only)."""
    marks = ["true"] * len(keys)
    marks[0], marks[-1] = "first_in_data_collection", "last_in_data_collection"
    return [("r", key, mark) for key, mark in zip(keys, marks, strict=True)]


def test_keys_the_re_snapshot_did_not_read_are_marked_deleted(engine: ChdbBackend) -> None:
    table = Table(engine, "items")
    reads = snapshot([1, 2, 3, 4, 5])
    table.batch(*reads[:3])
    table.batch(*reads[3:])  # the first snapshot: nothing to sweep
    table.batch(("u", 1, None), ("d", 2, None))  # offsets 5, 6
    assert table.markers() == [(2, 6, 6)]

    # Capture lost: 3 and 4 are deleted unseen. The new snapshot spans two batches.
    again = snapshot([1, 5, 6])  # offsets 7, 8, 9
    table.batch(*again[:2])
    last = table.batch(again[2], ("c", 3, None))  # 3 comes back after the snapshot, at 10
    assert table.live() == {1: "r@7", 3: "c@10", 5: "r@8", 6: "r@9"}
    # The ghost 4 is marked at version F = 7, offset L = 9; 2 was deleted already.
    assert table.markers() == [(2, 6, 6), (4, 7, 9)]
    # The read models' maintainer finds the rows a batch wrote by (_partition, _offset) in its
    # range (projector/read_models/maintenance.py, `apply_batch`): the marker is among them.
    changed = engine.rows(
        f"SELECT id FROM {table.replica.qualified} WHERE _partition = {last.partition} "
        f"AND _offset BETWEEN {last.first} AND {last.last} AND _is_deleted = 1"
    )
    assert [int(r["id"]) for r in changed] == [4], changed

    table.replay(last)  # a replay of the batch after a crash: the same markers, once more
    assert table.live() == {1: "r@7", 3: "c@10", 5: "r@8", 6: "r@9"}
    assert {m for m in table.markers()} == {(2, 6, 6), (4, 7, 9)}


def test_a_snapshot_of_one_row_sweeps_below_that_row(engine: ChdbBackend) -> None:
    table = Table(engine, "single")
    table.batch(*snapshot([1, 2, 3]))
    table.batch(("r", 2, "last"))  # one row left: its only read is marked last
    assert table.live() == {2: "r@3"}
    assert table.markers() == [(1, 3, 3), (3, 3, 3)]


def test_a_partitioned_topic_is_not_swept_and_warns_once(
    engine: ChdbBackend, caplog: pytest.LogCaptureFixture
) -> None:
    table = Table(engine, "spread", partitions=3)
    table.batch(*snapshot([1, 2, 3]))
    with caplog.at_level(logging.WARNING, logger="projector"):
        table.batch(*snapshot([1, 2]))
        table.batch(*snapshot([1]))
    assert table.live() == {1: "r@5", 2: "r@4", 3: "r@2"}  # the ghost stays
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "projector table reset public.spread" in warnings[0], warnings


def test_a_snapshot_whose_first_read_does_not_decode_stops_the_table_and_marks_nothing(
    engine: ChdbBackend,
) -> None:
    """Without its first bound, the snapshot would seem to begin at its last read: every key it
    read before that would be taken for a ghost and marked deleted. The table stops instead
    (BatchWork records it through the topic guard: later messages go to the DLQ)."""
    table = Table(engine, "unreadable")
    table.batch(*snapshot([1, 2, 3, 4]))
    assert table.stopped is None
    again = snapshot([1, 2, 4])  # 3 deleted unseen; the new snapshot's first read is broken
    table.batch(("broken", 1, "first_in_data_collection"), *again[1:])
    assert table.stopped is not None
    assert "offset 4 of cdc.public.unreadable[0] may bound a Debezium snapshot" in table.stopped
    assert "does not decode" in table.stopped
    assert table.markers() == []  # 2 and 4 were read: nothing may be swept from offset 6
    assert sorted(table.live()) == [1, 2, 3, 4]


def test_a_bound_that_cannot_be_read_because_the_registry_is_away_is_tried_again() -> None:
    class Away:
        def decode(self, value: bytes) -> Any:
            raise RegistryUnavailable("registry unreachable")

    messages = [RawMessage(TOPIC, 0, 0, b"k", encoded("r", "first"))]
    with pytest.raises(RegistryUnavailable):
        snapshot_bounds(messages, Away().decode)
