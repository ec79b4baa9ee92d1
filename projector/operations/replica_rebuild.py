"""Rebuilding a replica table from Kafka: `projector rebuild SCHEMA.TABLE --from kafka`.

A shadow table is built from the topic's earliest offsets while the live table keeps serving
and updating, then swapped in with `EXCHANGE TABLES` (atomic in Atomic databases, chDB
included). The job runs in the projector, between batches (projector/operations/requests.py argues why):

  - The shadow lives in a database of its own, `<replica prefix>rebuild_<id>_<schema>`, under
    the live table's name: it is applied by a `BatchApplier` whose catalog has that prefix, so
    the same apply code (schema evolution, upcasters, the fast path, deletes, truncates) builds
    it. A consumer per partition, assigned without a group, reads it in chunks on a thread of
    its own (`PartitionReader`: the next chunk is fetched and planned while ClickHouse applies
    this one); each chunk is committed like a batch (intent, inserts under the chunk's tokens,
    done) in the checkpoint projection `replica_rebuild:<id>`, so a crash resumes at its chunk
    and replays it exactly (the same range, the same tokens: ClickHouse drops what had landed).
  - Each step, with no batch in flight, moves every partition of the shadow at most one chunk
    towards the live table's position (`live_next`: the next offset the live table applies). The
    live table moves a batch per round, the shadow a chunk per round: it catches up.
  - Caught up means: for every partition the shadow's next offset equals the live one, with no
    batch in flight. Both tables then hold the effect of exactly the same messages: verified
    (column lists, row count and a hash of every row with `FINAL`, against each other), and only
    then exchanged. A reader sees the old table or the new, each complete and at the same
    position: never empty, partial or going backwards.
  - After the swap the previous table sits in the shadow database and is chased the same way,
    so `--rollback` (exchange back, once caught up) is exact; `--drop-old` drops it.

The history must be complete: if retention removed the start of a partition (its earliest
offset is above 0), `--from kafka` is refused, naming `--from snapshot`; with no `--from`, a
replica table is rebuilt from Kafka when Kafka holds its whole history, else from a snapshot.

`--from snapshot`: the shadow is rebuilt from Postgres through a Debezium incremental snapshot,
on the same machinery. In order:

  S1. The shadow starts empty (`CREATE TABLE … AS` the live table) at the live table's position
      P (per partition; its checkpoint records [0, P) as done), and the end N0 of Debezium's
      notification topic is noted; the job is recorded `snapshotting` with P, N0 and the signal
      id `projector-rebuild-<job>`.
  S2. The snapshot is asked for through the signal table under that id, `ON CONFLICT DO
      NOTHING`: asked again after a crash (each process asks once), it writes nothing to the WAL,
      so Debezium sees exactly one request.
  S3. Each step the shadow follows the live position from P, a chunk at a time, as above: it
      applies every message of the topic after P, streamed changes and the snapshot's reads
      alike, in topic order.
  S4. The notification topic (from N0) says when the table has been read whole:
      `snapshot_progress` finds the first TABLE_SCAN_COMPLETED of the table from a scan that
      began after N0. Then the table topic's end offsets E are recorded and the job is
      `catching-up`.
  S5. Caught up means, as above, the shadow at the live position with no batch in flight, and
      that position at or past E. The shadow is then compared with Postgres
      (projector/operations/verify.py's key-range hashes, in a fresh REPEATABLE READ snapshot) once the
      live table is within `LAG_TO_VERIFY` messages of Kafka's end; keys that differ are
      compared again after the pipeline moved on (`RECHECK_DELAYS_S`) until they agree or the
      checks run out (failed). The live table is compared too, for the report
      only: it may be what was wrong. Then the exchange, as above.

Why applying in topic order is exact (Debezium's incremental snapshot, DBLog): each chunk is
selected between a low and a high watermark written to the signal table; a key changed inside
that window is dropped from the chunk (its streamed event stands), and the chunk's remaining rows
are emitted as reads at the high watermark. So a read of a key sits in the topic after every
change of the key it reflects and before every later one: with `_version` = offset
(projector/replicas/catalog.py) the newest version of each key under `FINAL` is its current state. Every
key alive in Postgres when its chunk is read is read, or changed inside its window (an event
after P, since the request came after P); a key deleted before P is never read and never reaches
the shadow: no ghost rows, whatever the live table holds. A key deleted after P has its delete
event after P. The notification records go through the connector's one queue after the reads
they report on, and Kafka Connect's producer sends in that order (one request in flight per
broker), so the reads are in the topic when the TABLE_SCAN_COMPLETED is seen, and E covers
them; the comparison with Postgres is the check of this argument on every rebuild.

A repeated request (S2's id lost, the signal table emptied by hand) is harmless: a second scan
re-reads current rows, each read placed where it is valid by the same argument; it costs time.
A scan of the table already running at N0 may have read rows before P: it is not the one waited
for (Debezium appends the table again for this request, and the next scan is).

States (`replica_rebuilds`, latest row per id):

    snapshotting ──table read whole (--from snapshot)──┐
                                                       v
    catching-up ──caught up, verified──> swapped <──rollback / rollback──> rolled-back
        │                                    └───────────drop-old────────────┘──> dropped
        └──verification differs──> failed (nothing exchanged; the shadow is kept to look at)
    (a snapshot Debezium stopped or could not take fails the job too)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import DONE, INTENT, BatchRange, CheckpointStore
from projector.config import ProjectorConfig
from projector.errors import RebuildRefused, SourceUnavailable, VerifyError
from projector.messages import KafkaMessages
from projector.operations.requests import DONE as REQUEST_DONE
from projector.operations.requests import DROP_OLD, REBUILD, ROLLBACK, TAKEN, OpsRequests, Request
from projector.replicas.apply import BatchApplier
from projector.replicas.catalog import ReplicaCatalog
from projector.replicas.fast_path import FastPath
from projector.replicas.snapshot_sweep import SnapshotSweep
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters

log = logging.getLogger("projector.replica_rebuild")

SNAPSHOTTING, CATCHING_UP = "snapshotting", "catching-up"
SWAPPED, ROLLED_BACK, DROPPED, FAILED = "swapped", "rolled-back", "dropped", "failed"
BUILDING = (SNAPSHOTTING, CATCHING_UP)  # not swapped in yet
CHASED = (*BUILDING, SWAPPED, ROLLED_BACK)  # the shadow database's table is kept current
KAFKA, SNAPSHOT, AUTO = "kafka", "snapshot", "auto"  # where a rebuild reads from
CHUNK_MESSAGES = 50_000  # messages a shadow partition moves per step, at most (config's default)
NOT_HASHED = ("_ingested_at",)  # when a row was written differs between the two tables
JOB_COLUMNS = ("id", "table", "topic", "state", "detail", "source")
LAG_TO_VERIFY = 1_000  # S5: messages the live table may be behind Kafka's end when compared
RECHECK_DELAYS_S = (1.0, 2.0, 4.0, 8.0)  # S5: keys that differ from Postgres, compared again
# TABLE_SCAN_COMPLETED statuses of a table read whole (the others: Debezium could not read it)
SCANNED = ("SUCCEEDED", "EMPTY")


@dataclass
class ReplicaRebuild:
    id: str
    table: str  # SCHEMA.TABLE
    topic: str
    state: str
    detail: str = ""
    source: str = KAFKA  # KAFKA or SNAPSHOT
    # --from snapshot (S1, S4): "signal", "notifications_from" (N0), "start" and, once the table
    # is read whole, "end" (per partition, as text keys: it is stored as JSON)
    snapshot: dict[str, Any] = field(default_factory=dict)

    @property
    def schema(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.table.split(".", 1)[1]


@dataclass(frozen=True)
class SnapshotProgress:
    """How far Debezium's incremental snapshot of one table is, from its notifications."""

    done: bool = False
    failed: str = ""  # why the table will not be read whole
    rows: int | None = None  # TABLE_SCAN_COMPLETED's total_rows_scanned
    at: str = ""  # the last key read, while scanning


def _same_table(identifier: str | None, table: str) -> bool:
    """Debezium names a table `schema.table` (a catalog may precede it)."""
    return identifier is not None and identifier.split(".")[-2:] == table.split(".")


def snapshot_progress(notifications: Sequence[dict[str, Any]], table: str) -> SnapshotProgress:
    """S4: the progress of the scan of `table` (SCHEMA.TABLE) asked for after the notifications
    before these (`notifications`: decoded values of the notification topic from N0 on, in
    order). The scan waited for is the first one that *began* after N0: a TABLE_SCAN_COMPLETED
    of the table counts only once some other notification came first (a STARTED, another
    table's progress or completion, the table's own earlier completion); IN_PROGRESS and
    TABLE_SCAN_COMPLETED of the table alone may belong to a scan already running at N0."""
    began_after = False
    at = ""
    for note in notifications:
        if note.get("aggregate_type") != "Incremental Snapshot":
            continue
        kind, data = note.get("type"), note.get("additional_data") or {}
        if kind == "TABLE_SCAN_COMPLETED" and _same_table(data.get("scanned_collection"), table):
            if began_after:
                status = str(data.get("status"))
                rows = data.get("total_rows_scanned")
                if status not in SCANNED:
                    return SnapshotProgress(failed=f"Debezium could not snapshot {table}: "
                                                   f"{status}")  # fmt: skip
                return SnapshotProgress(done=True, rows=int(rows) if rows else None)
            began_after = True  # that scan began before N0; the one asked for comes next
            continue
        if kind == "IN_PROGRESS" and _same_table(data.get("current_collection_in_progress"), table):
            at = str(data.get("last_processed_key") or "")
            continue
        if kind == "ABORTED":
            stopped = [c for c in str(data.get("data_collections") or "").split(",") if c]
            if not stopped or any(_same_table(c, table) for c in stopped):
                return SnapshotProgress(failed=f"Debezium's snapshot of {table} was stopped "
                                               "(ABORTED)")  # fmt: skip
        began_after = True
    return SnapshotProgress(at=at if began_after else "")


@dataclass
class ReadChunk:
    """Offsets [first, end) of a partition as read: its messages (gaps: transaction markers,
    compaction) and what `PartitionReader.prepare` made of them, when it ran."""

    first: int
    end: int
    messages: list[Any]
    prepared: Any = None


class PartitionReader:
    """One partition read chunk after chunk, ahead of the chunk being applied.

    A consumer of its own, assigned once, is read on a thread of its own: while ClickHouse
    applies a chunk (chDB and the HTTP client release the GIL), the thread fetches the next
    ones, cuts them at `first + k * chunk` (where reading started) and has `prepare` make what
    their apply needs from them (the fast path's plan), holding at most `2 * chunk` messages.

    `read(first, end)` answers a chunk made ahead when [first, end) is one; any other range (the
    live position inside the next chunk, a replay) is answered message by message, without
    `prepared`, and the cuts go on from its end. A `first` other than where the last read ended
    starts the reading afresh there. Reading ahead changes nothing but memory and time: what is
    applied, and when, is the caller's choice."""

    def __init__(
        self, consumer: Consumer, topic: str, partition: int, chunk: int,
        prepare: Callable[[list[Any]], Any] | None = None,
    ) -> None:  # fmt: skip
        self.consumer = consumer
        self.topic = topic
        self.partition = partition
        self.chunk = max(1, chunk)
        self.prepare = prepare
        self._position: int | None = None  # where the next read is expected to start
        self._changed = threading.Condition()
        self._ready: deque[ReadChunk] = deque()  # cut and prepared, in offset order
        self._preparing: ReadChunk | None = None  # cut, being prepared (after `_ready`)
        self._buffer: deque[Any] = deque()  # consumed, not cut yet (after `_preparing`)
        self._cut_at = 0  # where the next cut begins
        self._end_seen = -1  # the highest end of the partition met (all before it consumed)
        self._failure: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def read(self, first: int, end: int, timeout_s: float = 60.0) -> ReadChunk:
        """Offsets [first, end); `prepared` is set when it is a chunk made ahead."""
        if first != self._position:
            self._start_at(first)
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self._failure is not None:
                    self._position = None
                    raise SourceUnavailable(
                        f"reading {self.topic}[{self.partition}]: {self._failure}"
                    )
                if not found:
                    if self._ready and (self._ready[0].first, self._ready[0].end) == (first, end):
                        chunk = self._ready.popleft()
                        self._changed.notify_all()  # room to read on
                        self._position = end
                        return chunk
                    coming = self._preparing or ReadChunk(
                        self._cut_at, self._cut_at + self.chunk, []
                    )
                    wait = not self._ready and (coming.first, coming.end) == (first, end)
                else:
                    wait = False
                if not wait:
                    if self._preparing is not None:
                        wait = True  # its messages come back with it
                    else:
                        self._take(first, end, found)
                        complete = self._ready or self._buffer or self._end_seen >= end
                        if complete or (found and found[-1].offset() == end - 1):
                            self._position = end
                            return ReadChunk(first, end, found)
                left = deadline - time.monotonic()
                if left <= 0:
                    self._position = None  # not where it was asked to be: start afresh next time
                    raise RebuildRefused(f"could not read {self.topic}[{self.partition}] "
                                         f"{first}-{end - 1} in {timeout_s:.0f} s")  # fmt: skip
                self._changed.wait(min(left, 1.0))

    def _take(self, first: int, end: int, found: list[Any]) -> None:
        """Move the messages of [first, end) into `found`, chunks made ahead undone (they do not
        fit the range asked for); cuts go on from `end`. Holding the lock."""
        undone = [m for chunk in self._ready for m in chunk.messages]
        self._ready.clear()
        self._buffer.extendleft(reversed(undone))
        buffer = self._buffer
        while buffer and buffer[0].offset() < end:
            message = buffer.popleft()
            if message.offset() >= first:
                found.append(message)
        self._cut_at = end
        self._changed.notify_all()  # room to read on

    def _start_at(self, first: int) -> None:
        self.stop()
        self.consumer.assign([TopicPartition(self.topic, self.partition, first)])
        self._ready, self._preparing, self._buffer = deque(), None, deque()
        self._cut_at, self._end_seen, self._failure, self._stopping = first, -1, None, False
        self._position = first
        self._thread = threading.Thread(
            target=self._fetch, name=f"rebuild-read-{self.topic}-{self.partition}", daemon=True
        )
        self._thread.start()

    def _held(self) -> int:
        """Messages held: consumed, cut, and being prepared (the bound of `2 * chunk`)."""
        preparing = len(self._preparing.messages) if self._preparing is not None else 0
        return len(self._buffer) + sum(len(c.messages) for c in self._ready) + preparing

    def _cut(self) -> ReadChunk | None:
        """The next chunk when every message of it is consumed (holding the lock)."""
        first, end = self._cut_at, self._cut_at + self.chunk
        buffer = self._buffer
        if not buffer or buffer[0].offset() < first:
            return None  # a read is taking messages before the cut
        if buffer[-1].offset() < end - 1 and self._end_seen < end:
            return None  # not all consumed yet
        messages = []
        while buffer and buffer[0].offset() < end:
            messages.append(buffer.popleft())
        self._cut_at = end
        return ReadChunk(first, end, messages)

    def _fetch(self) -> None:
        """The reading thread: consume, cut, prepare; at most `2 * chunk` messages held."""
        try:
            while True:
                with self._changed:
                    while self._held() >= 2 * self.chunk and not self._stopping:
                        self._changed.wait()
                    if self._stopping:
                        return
                    room = 2 * self.chunk - self._held()
                messages = self.consumer.consume(min(10_000, room), 0.5)
                with self._changed:
                    for message in messages:
                        error = message.error()
                        if error is None:
                            self._buffer.append(message)
                        elif error.code() == KafkaError._PARTITION_EOF:
                            # The end as it was when fetched: everything before it is consumed.
                            self._end_seen = max(self._end_seen, message.offset() or 0)
                        # other errors are librdkafka's to retry
                    self._preparing = self._cut()
                    self._changed.notify_all()
                while self._preparing is not None:
                    chunk = self._preparing
                    if self.prepare is not None and chunk.messages:
                        chunk.prepared = self.prepare(chunk.messages)  # outside the lock
                    with self._changed:
                        self._ready.append(chunk)
                        self._preparing = self._cut()
                        self._changed.notify_all()
        except BaseException as exc:  # handed to the next read
            with self._changed:
                self._failure, self._preparing = exc, None
                self._changed.notify_all()

    def stop(self) -> None:
        """Stop the reading thread (the consumer stays open and assigned)."""
        if self._thread is None:
            return
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self.consumer.close()


class ReplicaRebuilds:
    """The jobs and their control table; `step` and the actions run between batches."""

    def __init__(
        self, ch: ClickHouse, control_database: str, replica_prefix: str, topic_prefix: str,
        kafka_bootstrap: str, make_applier: Callable[[ReplicaCatalog, str], BatchApplier],
        chunk_messages: int = CHUNK_MESSAGES, source_dsn: str | None = None,
        notification_topic: str = "", schemas: SchemaCache | None = None,
    ) -> None:  # fmt: skip
        """`source_dsn`, `notification_topic` and `schemas` (to decode the notifications): for
        rebuilds from a snapshot (S1-S5)."""
        self.ch = ch
        self.control_database = control_database
        self.table = f"{ident(control_database)}.replica_rebuilds"
        self.replica_prefix = replica_prefix
        self.topic_prefix = topic_prefix
        self.kafka_bootstrap = kafka_bootstrap
        self.make_applier = make_applier
        self.chunk_messages = chunk_messages
        self._consumers: dict[str, Consumer] = {}
        self._readers: dict[tuple[str, int], PartitionReader] = {}
        self._appliers: dict[str, BatchApplier] = {}
        self._partitions: dict[str, list[int]] = {}
        self.source_dsn = source_dsn
        self.notification_topic = notification_topic
        self.schemas = schemas
        self._asked: set[str] = set()  # S2 done by this process, per job
        self._notes: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # per job: next offset, read
        self._drift: dict[str, list[str]] = {}  # S5: keys that differed from Postgres, per job
        self._checks: dict[str, tuple[int, float]] = {}  # S5: checks done, when the next is due
        self._lag: dict[str, int] = {}  # S5: messages the live table is behind Kafka's end

    @classmethod
    def for_config(
        cls, config: ProjectorConfig, ch: ClickHouse, schemas: SchemaCache,
        upcasters: Upcasters, partitions: Callable[[str], int | None],
    ) -> ReplicaRebuilds:  # fmt: skip
        """The rebuilds of `config`'s replica tables, in the projector or the chDB command alike.

        A shadow is applied by the live table's apply code (upcasters, the fast path, deletes,
        truncates), and swept after a re-snapshot in its history with bounds of its own
        (`partitions(topic)`: its partition count, None when unknown). Only transactions are
        not counted: the live table's ledger counted them, and counting decodes every chunk
        twice."""
        fast_path = None
        if config.fast_path and hasattr(ch, "over_avro"):
            fast_path = FastPath(ch, config.registry_url, count_transactions=False)  # type: ignore[arg-type]

        def applier(catalog: ReplicaCatalog, projection: str) -> BatchApplier:
            sweep = SnapshotSweep(ch, config.control_database, projection, partitions)
            return BatchApplier(ch, schemas, catalog, projection, upcasters=upcasters,
                                fast_path=fast_path, sweep=sweep)  # fmt: skip

        return cls(
            ch, config.control_database, config.replica_prefix, config.topic_prefix,
            config.kafka_bootstrap, applier, chunk_messages=config.replica_rebuild_chunk_messages,
            source_dsn=config.source_dsn, notification_topic=config.notification_topic,
            schemas=schemas,
        )  # fmt: skip

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.control_database))
        self.ch.execute(
            topology.create_table(
                self.table,
                ["id String", "table String", "topic String", "state LowCardinality(String)",
                 "detail String", "seq UInt64", "recorded_at DateTime64(3) DEFAULT now64(3)",
                 f"source LowCardinality(String) DEFAULT {quote(KAFKA)}",
                 "snapshot String DEFAULT '{}'"],
                "ReplacingMergeTree", "seq", "id", deduplicate=False,
            )
        )  # fmt: skip
        for column in (f"source LowCardinality(String) DEFAULT {quote(KAFKA)}",
                       "snapshot String DEFAULT '{}'"):  # fmt: skip  # a table from before them
            self.ch.execute(
                f"ALTER TABLE {self.table}{topology.on_cluster()} ADD COLUMN IF NOT EXISTS {column}"
            )

    def _record(self, job: ReplicaRebuild, state: str, detail: str = "") -> None:
        job.state, job.detail = state, detail
        self.ch.execute(
            f"INSERT INTO {self.table} (id, table, topic, state, detail, seq, source, snapshot) "
            f"VALUES ({quote(job.id)}, {quote(job.table)}, {quote(job.topic)}, {quote(state)}, "
            f"{quote(detail[:2000])}, {time.time_ns()}, {quote(job.source)}, "
            f"{quote(json.dumps(job.snapshot))})"
        )

    def _read_jobs(self, where: str) -> list[ReplicaRebuild]:
        return [
            ReplicaRebuild(**{k: r[k] for k in JOB_COLUMNS}, snapshot=json.loads(r["snapshot"]))
            for r in self.ch.rows(
                f"SELECT {', '.join(JOB_COLUMNS)}, snapshot FROM {self.table} "
                f"FINAL WHERE {where} ORDER BY seq"
            )
        ]

    def jobs(self, states: tuple[str, ...] = CHASED) -> list[ReplicaRebuild]:
        return self._read_jobs(f"state IN ({', '.join(quote(s) for s in states)})")

    def job(self, job_id: str) -> ReplicaRebuild | None:
        found = self._read_jobs(f"id = {quote(job_id)}")
        return found[0] if found else None

    # ---- names ----

    def live(self, job: ReplicaRebuild) -> str:
        return f"{ident(self.replica_prefix + job.schema)}.{ident(job.name)}"

    def shadow_prefix(self, job: ReplicaRebuild) -> str:
        return f"{self.replica_prefix}rebuild_{job.id}_"

    def shadow(self, job: ReplicaRebuild) -> str:
        return f"{ident(self.shadow_prefix(job) + job.schema)}.{ident(job.name)}"

    def checkpoints(self, job: ReplicaRebuild) -> CheckpointStore:
        return CheckpointStore(self.ch, self.control_database, f"replica_rebuild:{job.id}")

    # ---- starting ----

    def start(
        self, table: str, request_id: str, source: str = KAFKA, live_next: LiveNext | None = None
    ) -> ReplicaRebuild:
        """Start rebuilding `table` (SCHEMA.TABLE) as job `request_id` (a request taken twice
        finds its job), from `source`: KAFKA, SNAPSHOT or AUTO (Kafka when it holds the topic's
        whole history, else a snapshot). From Kafka is refused when it does not; a snapshot
        starts at the live position (`live_next`, with no batch in flight)."""
        existing = self.job(request_id)
        if existing is not None:
            return existing
        if "." not in table:
            raise RebuildRefused(f"{table!r}: give the replica table as SCHEMA.TABLE")
        busy = [j for j in self.jobs() if j.table == table]
        if busy and busy[0].state in BUILDING:
            raise RebuildRefused(f"{table} is already being rebuilt (job {busy[0].id})")
        if busy:  # one kept table per replica: a rollback has one meaning
            raise RebuildRefused(f"{table} still keeps the table its last rebuild replaced: "
                                 f"`projector rebuild {table} --drop-old` first")  # fmt: skip
        job = ReplicaRebuild(request_id, table, f"{self.topic_prefix}.{table}", CATCHING_UP)
        lows = self.earliest(job.topic)
        if not lows:
            raise RebuildRefused(f"Kafka has no topic {job.topic}")
        late = {p: low for p, low in lows.items() if low > 0}
        if source == AUTO:
            source = SNAPSHOT if late else KAFKA
        if source == KAFKA and late:
            raise RebuildRefused(
                f"{job.topic} no longer holds its whole history (retention removed it: earliest "
                f"offsets {late}); rebuild it from a snapshot instead (--from snapshot, or "
                f"`projector table reset {table}`)"
            )
        if source == SNAPSHOT:
            return self._start_snapshot(job, lows, live_next, late)
        self.ch.execute(self.ch.topology.create_database(self.shadow_prefix(job) + job.schema))
        self.checkpoints(job).create()
        self._record(job, CATCHING_UP)
        log.info("rebuilding %s from %s offset 0 into %s", table, job.topic, self.shadow(job))
        return job

    def _start_snapshot(
        self, job: ReplicaRebuild, lows: dict[int, int], live_next: LiveNext | None,
        late: dict[int, int],
    ) -> ReplicaRebuild:  # fmt: skip
        """S1 and S2."""
        if not self.source_dsn:
            raise RebuildRefused("a rebuild from a snapshot asks Debezium through the signal table "
                                 "and compares with Postgres, and no source database is "
                                 "configured (PROJECTOR_SOURCE_DSN, or the connector's PG_* / "
                                 "CDC_* variables)")  # fmt: skip
        if not self.notification_topic or self.schemas is None or live_next is None:
            raise RebuildRefused("a rebuild from a snapshot runs in the projector")
        live_database, name = self.replica_prefix + job.schema, job.name
        engine = self.ch.rows(f"SELECT engine FROM system.tables WHERE database = "
                              f"{quote(live_database)} AND name = {quote(name)}")  # fmt: skip
        if not engine:
            raise RebuildRefused(f"no replica table {live_database}.{name} to rebuild")
        if "Replacing" not in engine[0]["engine"]:
            raise RebuildRefused(f"{job.table} has no primary key: Debezium's incremental snapshot "
                                 "reads a table by its key, and its replica keeps every event")  # fmt: skip
        job.source = SNAPSHOT
        job.state = SNAPSHOTTING
        partitions = sorted(lows)
        live = live_next([(job.topic, p) for p in partitions])
        # S1. From the live position (or the earliest offset Kafka still has: a snapshot covers
        # what retention removed; the live table is then missing it too).
        start = {p: max(live.get((job.topic, p)) or 0, lows[p]) for p in partitions}
        self.ch.execute(self.ch.topology.create_database(self.shadow_prefix(job) + job.schema))
        self.ch.execute(f"CREATE TABLE IF NOT EXISTS {self.shadow(job)}"
                        f"{self.ch.topology.on_cluster()} AS {self.live(job)}")  # fmt: skip
        store = self.checkpoints(job)
        store.create()
        for p, offset in start.items():
            if offset > 0:  # [0, offset) counts as applied: the shadow reads from `offset`
                store.record(BatchRange(job.topic, p, 0, offset - 1), DONE)
        notes_end = self._end_offsets(self.notification_topic).get(0, 0)
        job.snapshot = {"signal": f"projector-rebuild-{job.id}", "notifications_from": notes_end,
                        "start": {str(p): o for p, o in start.items()}}  # fmt: skip
        why = f"Kafka no longer holds its whole history (earliest offsets {late}); " if late else ""
        self._record(job, SNAPSHOTTING, f"{why}rebuilding from a Debezium snapshot")
        self._ask_for_snapshot(job)  # S2, after the record: asked again on resume, harmlessly
        log.info("rebuilding %s from a Debezium snapshot into %s (from %s offsets %s)",
                 job.table, self.shadow(job), job.topic, start)  # fmt: skip
        return job

    def _ask_for_snapshot(self, job: ReplicaRebuild) -> None:
        """S2: once per process per job; the signal's id makes a repeat a no-op."""
        if job.id in self._asked:
            return
        import psycopg

        from connectors import request_incremental_snapshot

        try:
            with psycopg.connect(str(self.source_dsn), autocommit=True, connect_timeout=10) as conn:
                request_incremental_snapshot(conn, [job.table], job.snapshot["signal"])
        except psycopg.OperationalError as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SourceUnavailable(f"cannot ask Postgres for a snapshot of {job.table}: "
                                    f"{first_line}") from exc  # fmt: skip
        self._asked.add(job.id)

    def snapshot_progress(self, job: ReplicaRebuild) -> SnapshotProgress:
        """S4: Debezium's notifications since the request, read on from where this process
        left off (from N0 after a restart)."""
        topic = self.notification_topic
        start = int(job.snapshot.get("notifications_from", 0))
        offset, notes = self._notes.get(job.id, (start, []))
        end = self._end_offsets(topic).get(0, 0)
        if end > offset:
            assert self.schemas is not None
            for message in self._reader(topic, 0).read(offset, end).messages:
                value = message.value()
                if value:
                    try:
                        notes.append(self.schemas.decode(value)[1])
                    except Exception as exc:  # not Debezium's: nothing to learn from it
                        log.warning("skipping an undecodable record of %s: %s", topic, exc)
            offset = end
        self._notes[job.id] = (offset, notes)
        return snapshot_progress(notes, job.table)

    def _end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next message will get (empty: no such topic)."""
        consumer = self._consumer_for(topic)
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in metadata.partitions
        }

    def earliest(self, topic: str) -> dict[int, int]:
        consumer = self._consumer_for(topic)
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0]
            for p in metadata.partitions
        }

    def partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(self.earliest(topic))
        return self._partitions[topic]

    def _consumer_for(self, topic: str) -> Consumer:
        """A consumer for the topic's metadata and watermarks."""
        if topic not in self._consumers:
            self._consumers[topic] = self._new_consumer(topic)
        return self._consumers[topic]

    def _new_consumer(self, topic: str) -> Consumer:
        return Consumer({
            "bootstrap.servers": self.kafka_bootstrap,
            "group.id": f"projector-rebuild-{topic}",  # assigned, never subscribed
            "enable.auto.commit": False, "enable.partition.eof": True,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        })  # fmt: skip

    def _applier(self, job: ReplicaRebuild) -> BatchApplier:
        if job.id not in self._appliers:
            # No re-reads from Postgres: the live table asked for them when it met the events.
            catalog = ReplicaCatalog(self.ch, self.shadow_prefix(job))
            self._appliers[job.id] = self.make_applier(catalog, f"replica_rebuild:{job.id}")
        return self._appliers[job.id]

    # ---- between batches ----

    def step(
        self, job: ReplicaRebuild, live_next: Callable[[list[tuple[str, int]]], dict[tuple[str, int], int | None]]
    ) -> bool:  # fmt: skip
        """Move every partition of the shadow at most one chunk towards the live position
        (`live_next`: per partition, the next offset the live table applies; call with no batch
        in flight). True when the shadow is caught up."""
        if job.state == SNAPSHOTTING:
            self._ask_for_snapshot(job)  # S2 (a no-op when asked before)
            progress = self.snapshot_progress(job)  # S4
            if progress.failed:
                raise RebuildRefused(progress.failed)
            if progress.done:
                # The reads are in the topic (the module docstring): whatever is in it now
                # includes them.
                ends = self._end_offsets(job.topic)
                job.snapshot["end"] = {str(p): o for p, o in ends.items()}
                self._record(job, CATCHING_UP, f"Debezium read {job.table} whole "
                                               f"({progress.rows} rows); catching up to {ends}")  # fmt: skip
                log.info("rebuilding %s: Debezium's snapshot read it whole (%s rows); the shadow "
                         "catches up to %s", job.table, progress.rows, ends)  # fmt: skip
        partitions = self.partitions(job.topic)
        keys = [(job.topic, p) for p in partitions]
        live = live_next(keys)
        checkpoints = self.checkpoints(job).load(keys)
        # S5: a snapshot rebuild is caught up only past the end of the snapshot's reads.
        snapshot_end = job.snapshot.get("end", {}) if job.source == SNAPSHOT else {}
        caught_up = job.state != SNAPSHOTTING
        for key in keys:
            target = live.get(key) or 0
            checkpoint = checkpoints.get(key)
            if checkpoint is not None and checkpoint.state == INTENT:
                self._apply_chunk(job, key[1], checkpoint.first, checkpoint.last + 1)  # replay
                checkpoint = self.checkpoints(job).load([key]).get(key)
            shadow_next = 0 if checkpoint is None else checkpoint.resume_offset
            if shadow_next < target:
                end = min(target, shadow_next + self.chunk_messages)
                self._apply_chunk(job, key[1], shadow_next, end)
                # The live table does not move during a step: reaching it is being caught up.
                caught_up = caught_up and end == target
            if target < int(snapshot_end.get(str(key[1]), 0)):
                caught_up = False  # the live table has not applied the snapshot's end yet
        if caught_up and job.state == CATCHING_UP and job.source == SNAPSHOT:
            # S5 compares with Postgres *now*: not while the pipeline is far behind Kafka.
            ends = self._end_offsets(job.topic)
            self._lag[job.id] = sum(max(0, ends.get(p, 0) - (live.get(k) or 0))
                                    for k in keys for p in [k[1]])  # fmt: skip
        return caught_up

    def _apply_chunk(self, job: ReplicaRebuild, partition: int, first: int, end: int) -> None:
        """Apply offsets [first, end) of one partition to the shadow, committed like a batch."""
        applier = self._applier(job)
        chunk = self._reader(job.topic, partition, applier).read(first, end)
        batch = BatchRange(job.topic, partition, first, end - 1)
        store = self.checkpoints(job)
        if not chunk.messages:  # only gaps (transaction markers, compaction)
            store.record(batch, DONE)
            return
        store.record(batch, INTENT)
        log.info("rebuilding %s: %s[%d] %d-%d", job.table, job.topic, partition, first, end - 1)
        messages, segments = chunk.prepared or (KafkaMessages(chunk.messages), None)
        # Dead letters were recorded when the live table met them: the shadow drops them alike.
        applier.apply(batch, messages, lambda _batch, _letters: None, segments,
                      planned=chunk.prepared is not None)  # fmt: skip
        store.record(batch, DONE)

    def _reader(
        self, topic: str, partition: int, applier: BatchApplier | None = None
    ) -> PartitionReader:
        """The partition's reader; with `applier`, chunks read ahead are planned ahead too."""
        key = (topic, partition)
        if key not in self._readers:

            def plan(messages: list[Any]) -> tuple[KafkaMessages, Any]:
                assert applier is not None
                read = KafkaMessages(messages)
                return read, applier.plan(read)

            self._readers[key] = PartitionReader(
                self._new_consumer(topic), topic, partition, self.chunk_messages,
                None if applier is None else plan,
            )  # fmt: skip
        return self._readers[key]

    def verify(self, job: ReplicaRebuild) -> str:
        """The two tables (caught up, no batch in flight) against each other: "" when equal."""
        sides = {}
        for label, table in (("live", self.live(job)), ("rebuilt", self.shadow(job))):
            database, name = (p.strip("`") for p in table.split(".", 1))
            columns = [
                (r["name"], r["type"]) for r in self.ch.rows(
                    f"SELECT name, type FROM system.columns WHERE database = {quote(database)} "
                    f"AND table = {quote(name)} ORDER BY position"
                )
            ]  # fmt: skip
            engine = self.ch.rows(
                f"SELECT engine FROM system.tables WHERE database = {quote(database)} "
                f"AND name = {quote(name)}"
            )
            if not engine:  # nothing was applied to it: Kafka gave no message from offset 0
                return f"the {label} table {table} does not exist"
            final = " FINAL" if engine and "Replacing" in engine[0]["engine"] else ""
            hashed = ", ".join(ident(n) for n, _ in columns if n not in NOT_HASHED)
            (row,) = self.ch.rows(
                f"SELECT count() AS n, sum(cityHash64({hashed})) AS h FROM {table}{final}"
            )
            sides[label] = (columns, int(row["n"]), int(row["h"] or 0))
        (live_cols, live_n, live_h), (new_cols, new_n, new_h) = sides["live"], sides["rebuilt"]
        if live_cols != new_cols:
            return f"columns differ: live {live_cols}, rebuilt {new_cols}"
        if (live_n, live_h) != (new_n, new_h):
            return (
                f"rows differ: live {live_n} rows (hash {live_h}), rebuilt {new_n} (hash {new_h})"
            )
        return ""

    def fail(self, job: ReplicaRebuild, reason: str) -> None:
        """Stop the job (nothing is exchanged; its shadow stays to look at)."""
        self._record(job, FAILED, reason)

    def exchange(self, job: ReplicaRebuild) -> None:
        """Swap the live table and the shadow database's table, in one atomic statement."""
        self.ch.execute(f"EXCHANGE TABLES {self.live(job)} AND {self.shadow(job)}")

    def finish_step(self, job: ReplicaRebuild, caught_up: bool) -> str | None:
        """After a step: a caught-up job still catching up is verified and swapped in."""
        if job.state != CATCHING_UP or not caught_up:
            return None
        if job.source == SNAPSHOT:
            return self._finish_snapshot(job)
        drift = self.verify(job)
        if drift:
            self._record(job, FAILED, drift)
            return f"rebuild of {job.table} failed verification (not swapped): {drift}"
        self.exchange(job)
        self._record(job, SWAPPED, f"previous table kept as {self.shadow(job)}")
        return f"{job.table} rebuilt from Kafka and swapped in (previous kept: {self.shadow(job)})"

    def _finish_snapshot(self, job: ReplicaRebuild) -> str | None:
        """S5: the shadow against Postgres (keys that differ compared again on later rounds,
        after the pipeline moved on), then against the live table for the report, then the
        exchange. None while the keys are still being checked."""
        checks, due = self._checks.get(job.id, (0, 0.0))
        if time.monotonic() < due or self._lag.get(job.id, 0) > LAG_TO_VERIFY:
            return None  # a lagging pipeline's keys differ from Postgres: not counted as checks
        try:
            rows, drift = self.compare_with_postgres(job, self._drift.get(job.id))
        except (VerifyError, SourceUnavailable) as exc:  # checked again next round
            log.warning("rebuild of %s: cannot compare with Postgres now: %s", job.table, exc)
            self._checks[job.id] = (checks, time.monotonic() + RECHECK_DELAYS_S[0])
            return None
        if drift:
            if checks >= len(RECHECK_DELAYS_S):
                shown = "; ".join(drift[:5])
                reason = (f"{len(drift)} key(s) differ from Postgres after {checks + 1} "
                          f"comparisons: {shown}")  # fmt: skip
                self._record(job, FAILED, reason)
                return f"rebuild of {job.table} failed verification (not swapped): {reason}"
            self._drift[job.id] = drift
            self._checks[job.id] = (checks + 1, time.monotonic() + RECHECK_DELAYS_S[checks])
            log.info("rebuild of %s: %d key(s) differ from Postgres; compared again in %.0f s "
                     "(writes may be on their way)", job.table, len(drift),
                     RECHECK_DELAYS_S[checks])  # fmt: skip
            return None
        self._drift.pop(job.id, None)
        self._checks.pop(job.id, None)
        against_live = self.verify(job)
        self.exchange(job)
        live_note = (f"; it differed from the live table ({against_live})" if against_live
                     else "; equal to the live table")  # fmt: skip
        detail = (f"verified against Postgres ({rows} rows){live_note}; previous table kept as "
                  f"{self.shadow(job)}")  # fmt: skip
        self._record(job, SWAPPED, detail)
        return f"{job.table} rebuilt from a Debezium snapshot and swapped in: {detail}"

    def compare_with_postgres(
        self, job: ReplicaRebuild, keys: list[str] | None = None
    ) -> tuple[int, list[str]]:
        """The shadow against its source table in a fresh snapshot (projector/operations/verify.py): the
        rows compared and the keys (as verify's key texts) that differ; only `keys` if given."""
        from projector.config import ProjectorConfig
        from projector.operations.verify import PostgresSnapshot, TableVerifier

        config = ProjectorConfig(replica_prefix=self.replica_prefix,
                                 control_database=self.control_database,
                                 transaction_metadata=False)  # fmt: skip
        postgres = PostgresSnapshot(str(self.source_dsn))
        try:
            verifier = TableVerifier(config, self.ch, postgres, projector_may_run=False)
            plan = verifier.plan(job.table, self.shadow_prefix(job) + job.schema)
            if isinstance(plan, str):
                raise VerifyError(f"{job.table} cannot be compared with Postgres: {plan}")
            verdict, drift = verifier.compare_now(plan, keys)
        finally:
            postgres.close()
        return verdict.postgres_rows or 0, sorted(drift)

    def rollback(self, job: ReplicaRebuild) -> str:
        """Exchange back (the caller caught the job up first)."""
        self.exchange(job)
        state = ROLLED_BACK if job.state == SWAPPED else SWAPPED
        self._record(job, state, f"the other table kept as {self.shadow(job)}")
        return f"{job.table}: {'previous' if state == ROLLED_BACK else 'rebuilt'} table serving"

    def drop_old(self, job: ReplicaRebuild) -> str:
        self.ch.execute(f"DROP TABLE IF EXISTS {self.shadow(job)}")
        self.ch.execute(f"DROP DATABASE IF EXISTS {ident(self.shadow_prefix(job) + job.schema)}")
        self._record(job, DROPPED)
        return f"{job.table}: dropped {self.shadow(job)}"

    def forget(self, job: ReplicaRebuild) -> None:
        """Drop what this process holds about `job` (it failed, or ended)."""
        for held in (self._asked, self._notes, self._drift, self._checks, self._lag):
            held.discard(job.id) if isinstance(held, set) else held.pop(job.id, None)
        for key in [k for k in self._readers if k[0] == job.topic]:  # its reading threads
            self._readers.pop(key).close()

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


LiveNext = Callable[[list[tuple[str, int]]], dict[tuple[str, int], int | None]]


def take_replica_requests(
    requests: OpsRequests, rebuilds: ReplicaRebuilds, live_next: LiveNext
) -> list[str]:
    """Act on the pending requests naming a replica table (SCHEMA.TABLE), between batches: a
    rebuild starts its job; a rollback catches the job up (nothing else is applied meanwhile)
    and exchanges back; a drop drops the table not serving."""
    return [
        requests.carry_out(request, partial(_act, request, rebuilds, live_next))
        for request in requests.pending()
        if "." in request.target  # a read model's is projector/operations/requests.py's
    ]


def _act(request: Request, rebuilds: ReplicaRebuilds, live_next: LiveNext) -> tuple[str, str, str]:
    if request.action == REBUILD:
        job = rebuilds.start(request.target, request.id, _source(request.options), live_next)
        origin = "a Debezium snapshot" if job.source == SNAPSHOT else "Kafka"
        line = f"rebuilding {request.target} from {origin} (job {job.id})"
        return TAKEN, job.id, line + (f": {job.detail}" if job.detail else "")
    kept = [j for j in rebuilds.jobs((SWAPPED, ROLLED_BACK)) if j.table == request.target]
    if not kept:
        raise RebuildRefused(f"{request.target} keeps no previous table (never rebuilt, "
                             "or dropped with --drop-old)")  # fmt: skip
    job = kept[-1]
    if request.action == ROLLBACK:
        while not rebuilds.step(job, live_next):
            pass
        line = rebuilds.rollback(job)
    elif request.action == DROP_OLD:
        line = rebuilds.drop_old(job)
    else:
        raise RebuildRefused(f"{request.action} is not done for replica tables")
    return REQUEST_DONE, line, line


def _source(options: str) -> str:
    """Where a request asks to rebuild from (`from-kafka`, `from-snapshot`, `from-auto`)."""
    for option in options.split(","):
        if option.startswith("from-"):
            return option[len("from-") :]
    return KAFKA  # requests from before --from snapshot existed


def run_replica_jobs_here(
    requests: OpsRequests, rebuilds: ReplicaRebuilds, live_next: LiveNext,
    on_step: Callable[[ReplicaRebuild], None] = lambda job: None,
) -> list[str]:  # fmt: skip
    """The projector's part in this process (chDB: no projector runs): take the requests and
    catch every rebuilding job up, verify and swap it. The live table does not move here."""
    lines = take_replica_requests(requests, rebuilds, live_next)
    for job in rebuilds.jobs((CATCHING_UP,)):
        if job.source == SNAPSHOT:
            continue  # the live table must move for its reads to arrive: `projector run` does it
        while True:
            caught_up = rebuilds.step(job, live_next)
            on_step(job)
            if caught_up:
                break
        line = rebuilds.finish_step(job, True)
        if line:
            lines.append(line)
    return lines
