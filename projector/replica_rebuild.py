"""Rebuilding a replica table from Kafka: `projector rebuild SCHEMA.TABLE --from kafka`.

A shadow table is built from the topic's earliest offsets while the live table keeps serving
and updating, then swapped in with `EXCHANGE TABLES` (atomic in Atomic databases, chDB
included). The job runs in the projector, between batches (projector/rebuild.py argues why):

  - The shadow lives in a database of its own, `<replica prefix>rebuild_<id>_<schema>`, under
    the live table's name: it is applied by a `BatchApplier` whose catalog has that prefix, so
    the same apply code (schema evolution, upcasters, the fast path, deletes, truncates) builds
    it. A separate consumer, assigned to the topic without a group, reads it in chunks; each
    chunk is committed like a batch (intent, inserts under the chunk's tokens, done) in the
    checkpoint projection `replica_rebuild:<id>`, so a crash resumes at its chunk and replays it
    exactly (the same range, the same tokens: ClickHouse drops what had landed).
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
offset is above 0), `--from kafka` is refused, naming `--from snapshot`.

States (`replica_rebuilds`, latest row per id):

    catching-up ──caught up, verified──> swapped <──rollback / rollback──> rolled-back
        │                                    └───────────drop-old────────────┘──> dropped
        └──verification differs──> failed (nothing exchanged; the shadow is kept to look at)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, TopicPartition

from projector.apply import BatchApplier
from projector.checkpoint import DONE, INTENT, BatchRange, CheckpointStore
from projector.clickhouse import ClickHouse, ident, quote
from projector.errors import RebuildRefused
from projector.messages import KafkaMessages
from projector.rebuild import DONE as REQUEST_DONE
from projector.rebuild import DROP_OLD, REBUILD, ROLLBACK, TAKEN, OpsRequests
from projector.rebuild import FAILED as REQUEST_FAILED
from projector.replica import ReplicaCatalog

log = logging.getLogger("projector.replica_rebuild")

CATCHING_UP, SWAPPED, ROLLED_BACK = "catching-up", "swapped", "rolled-back"
DROPPED, FAILED = "dropped", "failed"
CHASED = (CATCHING_UP, SWAPPED, ROLLED_BACK)  # the shadow database's table is kept current
CHUNK_MESSAGES = 20_000  # messages a shadow partition moves per step, at most
NOT_HASHED = ("_ingested_at",)  # when a row was written differs between the two tables


@dataclass
class ReplicaRebuild:
    id: str
    table: str  # SCHEMA.TABLE
    topic: str
    state: str
    detail: str = ""

    @property
    def schema(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.table.split(".", 1)[1]


class ReplicaRebuilds:
    """The jobs and their control table; `step` and the actions run between batches."""

    def __init__(
        self, ch: ClickHouse, control_database: str, replica_prefix: str, topic_prefix: str,
        kafka_bootstrap: str, make_applier: Callable[[ReplicaCatalog, str], BatchApplier],
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> None:  # fmt: skip
        self.ch = ch
        self.control_database = control_database
        self.table = f"{ident(control_database)}.replica_rebuilds"
        self.replica_prefix = replica_prefix
        self.topic_prefix = topic_prefix
        self.kafka_bootstrap = kafka_bootstrap
        self.make_applier = make_applier
        self.chunk_messages = chunk_messages
        self._consumers: dict[str, Consumer] = {}
        self._appliers: dict[str, BatchApplier] = {}
        self._partitions: dict[str, list[int]] = {}

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.control_database))
        self.ch.execute(
            topology.create_table(
                self.table,
                ["id String", "table String", "topic String", "state LowCardinality(String)",
                 "detail String", "seq UInt64", "recorded_at DateTime64(3) DEFAULT now64(3)"],
                "ReplacingMergeTree", "seq", "id", deduplicate=False,
            )
        )  # fmt: skip

    def _record(self, job: ReplicaRebuild, state: str, detail: str = "") -> None:
        job.state, job.detail = state, detail
        self.ch.execute(
            f"INSERT INTO {self.table} (id, table, topic, state, detail, seq) VALUES "
            f"({quote(job.id)}, {quote(job.table)}, {quote(job.topic)}, {quote(state)}, "
            f"{quote(detail[:2000])}, {time.time_ns()})"
        )

    def jobs(self, states: tuple[str, ...] = CHASED) -> list[ReplicaRebuild]:
        wanted = ", ".join(quote(s) for s in states)
        return [
            ReplicaRebuild(r["id"], r["table"], r["topic"], r["state"], r["detail"])
            for r in self.ch.rows(
                f"SELECT id, table, topic, state, detail FROM {self.table} FINAL "
                f"WHERE state IN ({wanted}) ORDER BY seq"
            )
        ]

    def job(self, job_id: str) -> ReplicaRebuild | None:
        found = [
            ReplicaRebuild(r["id"], r["table"], r["topic"], r["state"], r["detail"])
            for r in self.ch.rows(
                f"SELECT id, table, topic, state, detail FROM {self.table} FINAL "
                f"WHERE id = {quote(job_id)}"
            )
        ]
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

    def start(self, table: str, request_id: str) -> ReplicaRebuild:
        """Start rebuilding `table` (SCHEMA.TABLE) as job `request_id` (a request taken twice
        finds its job). Refused when Kafka no longer holds the topic's whole history."""
        existing = self.job(request_id)
        if existing is not None:
            return existing
        if "." not in table:
            raise RebuildRefused(f"{table!r}: give the replica table as SCHEMA.TABLE")
        busy = [j for j in self.jobs() if j.table == table]
        if busy and busy[0].state == CATCHING_UP:
            raise RebuildRefused(f"{table} is already being rebuilt (job {busy[0].id})")
        if busy:  # one kept table per replica: a rollback has one meaning
            raise RebuildRefused(f"{table} still keeps the table its last rebuild replaced: "
                                 f"`projector rebuild {table} --drop-old` first")  # fmt: skip
        job = ReplicaRebuild(request_id, table, f"{self.topic_prefix}.{table}", CATCHING_UP)
        lows = self._earliest(job.topic)
        if not lows:
            raise RebuildRefused(f"Kafka has no topic {job.topic}")
        late = {p: low for p, low in lows.items() if low > 0}
        if late:
            raise RebuildRefused(
                f"{job.topic} no longer holds its whole history (retention removed it: earliest "
                f"offsets {late}); rebuild it from a snapshot instead (--from snapshot, or "
                f"`projector table reset {table}`)"
            )
        self.ch.execute(self.ch.topology.create_database(self.shadow_prefix(job) + job.schema))
        self.checkpoints(job).create()
        self._record(job, CATCHING_UP)
        log.info("rebuilding %s from %s offset 0 into %s", table, job.topic, self.shadow(job))
        return job

    def _earliest(self, topic: str) -> dict[int, int]:
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
            self._partitions[topic] = sorted(self._earliest(topic))
        return self._partitions[topic]

    def _consumer_for(self, topic: str) -> Consumer:
        if topic not in self._consumers:
            self._consumers[topic] = Consumer({
                "bootstrap.servers": self.kafka_bootstrap,
                "group.id": f"projector-rebuild-{topic}",  # assigned, never subscribed
                "enable.auto.commit": False, "enable.partition.eof": True,
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
            })  # fmt: skip
        return self._consumers[topic]

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
        partitions = self.partitions(job.topic)
        keys = [(job.topic, p) for p in partitions]
        live = live_next(keys)
        checkpoints = self.checkpoints(job).load(keys)
        caught_up = True
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
        return caught_up

    def _apply_chunk(self, job: ReplicaRebuild, partition: int, first: int, end: int) -> None:
        """Apply offsets [first, end) of one partition to the shadow, committed like a batch."""
        messages = self._read(job.topic, partition, first, end)
        batch = BatchRange(job.topic, partition, first, end - 1)
        store = self.checkpoints(job)
        if not messages:  # only gaps (transaction markers, compaction)
            store.record(batch, DONE)
            return
        store.record(batch, INTENT)
        log.info("rebuilding %s: %s[%d] %d-%d", job.table, job.topic, partition, first, end - 1)
        applier = self._applier(job)
        # Dead letters were recorded when the live table met them: the shadow drops them alike.
        applier.apply(batch, KafkaMessages(messages), lambda _batch, _letters: None)
        store.record(batch, DONE)

    def _read(self, topic: str, partition: int, first: int, end: int) -> list[object]:
        """The messages of offsets [first, end) (gaps: transaction markers, compaction)."""
        consumer = self._consumer_for(topic)
        consumer.assign([TopicPartition(topic, partition, first)])
        found: list[object] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for message in consumer.consume(min(10_000, end - first), 1.0):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        return found
                    continue
                offset = message.offset()
                if offset is None or offset < first:
                    continue
                if offset >= end:
                    return found
                found.append(message)
                if offset == end - 1:
                    return found
        raise RebuildRefused(f"could not read {topic}[{partition}] {first}-{end - 1} in 60 s")

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
        drift = self.verify(job)
        if drift:
            self._record(job, FAILED, drift)
            return f"rebuild of {job.table} failed verification (not swapped): {drift}"
        self.exchange(job)
        self._record(job, SWAPPED, f"previous table kept as {self.shadow(job)}")
        return f"{job.table} rebuilt from Kafka and swapped in (previous kept: {self.shadow(job)})"

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

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()


LiveNext = Callable[[list[tuple[str, int]]], dict[tuple[str, int], int | None]]


def take_replica_requests(
    requests: OpsRequests, rebuilds: ReplicaRebuilds, live_next: LiveNext
) -> list[str]:
    """Act on the pending requests naming a replica table (SCHEMA.TABLE), between batches: a
    rebuild starts its job; a rollback catches the job up (nothing else is applied meanwhile)
    and exchanges back; a drop drops the table not serving."""
    lines = []
    for request in requests.pending():
        if "." not in request.target:
            continue  # a read model's: projector/rebuild.py
        try:
            if request.action == REBUILD:
                job = rebuilds.start(request.target, request.id)
                requests.settle(request, TAKEN, job.id)
                lines.append(f"rebuilding {request.target} from Kafka (job {job.id})")
                continue
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
        except RebuildRefused as exc:
            requests.settle(request, REQUEST_FAILED, str(exc))
            lines.append(f"refused {request.action} {request.target}: {exc}")
            continue
        requests.settle(request, REQUEST_DONE, line)
        lines.append(line)
    return lines


def run_replica_jobs_here(
    requests: OpsRequests, rebuilds: ReplicaRebuilds, live_next: LiveNext,
    on_step: Callable[[ReplicaRebuild], None] = lambda job: None,
) -> list[str]:  # fmt: skip
    """The projector's part in this process (chDB: no projector runs): take the requests and
    catch every rebuilding job up, verify and swap it. The live table does not move here."""
    lines = take_replica_requests(requests, rebuilds, live_next)
    for job in rebuilds.jobs((CATCHING_UP,)):
        while True:
            caught_up = rebuilds.step(job, live_next)
            on_step(job)
            if caught_up:
                break
        line = rebuilds.finish_step(job, True)
        if line:
            lines.append(line)
    return lines
