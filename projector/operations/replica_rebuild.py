"""Rebuilding a replica table from Kafka: `projector rebuild SCHEMA.TABLE --from kafka`.

A shadow table is built from the topic's earliest offsets while the live table keeps serving
and updating, then swapped in with `EXCHANGE TABLES` (atomic in Atomic databases, chDB
included). The job runs in the projector, between batches (projector/operations/requests.py argues why):

  - The shadow lives in a database of its own, `<replica prefix>rebuild_<id>_<schema>`, under
    the live table's name: it is applied by a `BatchApplier` whose catalog has that prefix, so
    the same apply code (schema evolution, upcasters, the fast path, deletes, truncates) builds
    it. A consumer per partition, assigned without a group, reads it in chunks on a thread of
    its own (`PartitionReader`, projector/operations/read_ahead.py: the next chunk is fetched
    and planned while ClickHouse applies this one); each chunk is committed like a batch
    (intent, inserts under the chunk's tokens, done) in the checkpoint projection
    `replica_rebuild:<id>`, so a crash resumes at its chunk and replays it exactly (the same
    range, the same tokens: ClickHouse drops what had landed).
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
      `snapshot_progress` (projector/operations/snapshot_notifications.py) finds the first TABLE_SCAN_COMPLETED of the table from a scan that
      began after N0. Then the table topic's end offsets E are recorded and the job is
      `catching-up`.
  S5. Caught up means, as above, the shadow at the live position with no batch in flight, and
      that position at or past E. The shadow is then compared with Postgres
      (projector/operations/verify.py's key-range hashes, in a fresh REPEATABLE READ snapshot) once the
      live table is within `LAG_TO_VERIFY` messages of Kafka's end; keys that differ are
      compared again after the pipeline moved on until they agree or the rounds run out
      (failed): projector/operations/postgres_rounds.py. The live table is compared too, for the report
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

States (`replica_rebuilds`, latest row per id: projector/operations/replica_rebuild_jobs.py):

    snapshotting ──table read whole (--from snapshot)──┐
                                                       v
    catching-up ──caught up, verified──> swapped <──rollback / rollback──> rolled-back
        │                                    └───────────drop-old────────────┘──> dropped
        └──verification differs──> failed (nothing exchanged; the shadow is kept to look at)
    (a snapshot Debezium stopped or could not take fails the job too)

Here: the protocol (`ReplicaRebuilds`) and the requests naming a replica table
(`take_replica_requests`; with chDB the command drives the same duty in-process:
`rebuild_replicas_here`, projector/run/upkeep.py). Its parts, each in a module of
its own under projector/operations/: the job records (replica_rebuild_jobs.py), what is done
to a shadow table (shadow_tables.py), the topics read (rebuild_topics.py, on read_ahead.py),
Debezium's notifications (snapshot_notifications.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import DONE, INTENT, BatchRange
from projector.config import ProjectorConfig
from projector.errors import RebuildRefused, SourceUnavailable
from projector.operations.partial_reread import PartialRereads
from projector.operations.postgres_rounds import ComparisonRounds
from projector.operations.rebuild_topics import RebuildTopics
from projector.operations.replica_rebuild_jobs import (
    AUTO,
    BUILDING,
    CATCHING_UP,
    DROPPED,
    FAILED,
    KAFKA,
    ROLLED_BACK,
    SNAPSHOT,
    SNAPSHOTTING,
    SWAPPED,
    ReplicaRebuild,
    ReplicaRebuildJobs,
)
from projector.operations.requests import DONE as REQUEST_DONE
from projector.operations.requests import DROP_OLD, REBUILD, ROLLBACK, TAKEN, OpsRequests, Request
from projector.operations.shadow_tables import ShadowTables
from projector.operations.snapshot_notifications import SnapshotNotifications
from projector.replicas.apply import BatchApplier
from projector.replicas.catalog import ReplicaCatalog
from projector.replicas.fast_path import FastPath
from projector.replicas.snapshot_sweep import SnapshotSweep
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters

log = logging.getLogger("projector.replica_rebuild")

CHUNK_MESSAGES = 50_000  # messages a shadow partition moves per step, at most (config's default)


class ReplicaRebuilds:
    """The protocol above, between batches: a job started, stepped, verified and exchanged,
    rolled back, or its old table dropped. Its parts: `job_store` (the records, and the names
    of a job's tables), `topics`, `notifications` and `shadows` (the modules named above)."""

    def __init__(
        self,
        ch: ClickHouse,
        control_database: str,
        replica_prefix: str,
        topic_prefix: str,
        kafka_bootstrap: str,
        make_applier: Callable[[ReplicaCatalog, str], BatchApplier],
        chunk_messages: int = CHUNK_MESSAGES,
        source_dsn: str | None = None,
        notification_topic: str = "",
        schemas: SchemaCache | None = None,
        publication: str | None = None,
    ) -> None:
        """`source_dsn`, `notification_topic` and `schemas` (to decode the notifications): for
        rebuilds from a snapshot (S1-S5); `publication`: whose row filters a snapshot keeps."""
        self.publication = publication
        self.ch = ch
        self.replica_prefix = replica_prefix
        self.topic_prefix = topic_prefix
        self.chunk_messages = chunk_messages
        self.source_dsn = source_dsn
        self.notification_topic = notification_topic
        self.schemas = schemas
        self.job_store = ReplicaRebuildJobs(ch, control_database, replica_prefix)
        self.topics = RebuildTopics(kafka_bootstrap, chunk_messages)
        self.shadows = ShadowTables(
            ch, self.job_store, self.topics, make_applier, control_database, source_dsn
        )
        self.notifications = SnapshotNotifications(self.topics, notification_topic, schemas)
        self._asked: set[str] = set()  # S2 done by this process, per job
        self.rounds = ComparisonRounds()  # S5
        self.partial = PartialRereads(
            ch,
            self.job_store,
            self.topics,
            self.notifications,
            self.rounds,
            source_dsn,
            self._ask_for_snapshot,
        )

    @classmethod
    def for_config(
        cls,
        config: ProjectorConfig,
        ch: ClickHouse,
        schemas: SchemaCache,
        upcasters: Upcasters,
        partitions: Callable[[str], int | None],
    ) -> ReplicaRebuilds:
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
            # A shadow keeps deleted rows as the live table does (soft, history), and writes no
            # history: the live table's has every version of the events it re-applies.
            catalog.delete_policies = dict(config.delete_policy)
            return BatchApplier(
                ch,
                schemas,
                catalog,
                projection,
                upcasters=upcasters,
                fast_path=fast_path,
                sweep=sweep,
            )

        return cls(
            ch,
            config.control_database,
            config.replica_prefix,
            config.topic_prefix,
            config.kafka_bootstrap,
            applier,
            chunk_messages=config.replica_rebuild_chunk_messages,
            source_dsn=config.source_dsn,
            notification_topic=config.notification_topic,
            schemas=schemas,
            publication=config.publication,
        )

    def create(self) -> None:
        self.job_store.create()

    # ---- starting ----

    def start(
        self,
        table: str,
        request_id: str,
        source: str = KAFKA,
        live_next: LiveNext | None = None,
        where: str = "",
    ) -> ReplicaRebuild:
        """Start rebuilding `table` (SCHEMA.TABLE) as job `request_id` (a request taken twice
        finds its job), from `source`: KAFKA, SNAPSHOT or AUTO (Kafka when it holds the topic's
        whole history, else a snapshot). From Kafka is refused when it does not; a snapshot
        starts at the live position (`live_next`, with no batch in flight). With `where`, only
        the rows matching that Postgres condition are re-read (projector/operations/partial_reread.py)."""
        existing = self.job_store.job(request_id)
        if existing is not None:
            return existing
        if "." not in table:
            raise RebuildRefused(f"{table!r}: give the replica table as SCHEMA.TABLE")
        busy = [j for j in self.job_store.jobs() if j.table == table]
        if busy and busy[0].state in BUILDING:
            raise RebuildRefused(f"{table} is already being rebuilt (job {busy[0].id})")
        if where and source == KAFKA:
            raise RebuildRefused("--where re-reads rows from Postgres: give --from snapshot")
        if busy and not where:  # one kept table per replica: a rollback has one meaning
            raise RebuildRefused(
                f"{table} still keeps the table its last rebuild replaced: "
                f"`projector rebuild {table} --drop-old` first"
            )
        job = ReplicaRebuild(request_id, table, f"{self.topic_prefix}.{table}", CATCHING_UP)
        lows = self.topics.earliest(job.topic)
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
        if where:
            if live_next is None or not self.notification_topic or self.schemas is None:
                raise RebuildRefused("a partial re-read runs in the projector")
            self._keyed_replica(job)
            live = live_next([(job.topic, p) for p in sorted(lows)])
            return self.partial.start(job, where, live, self.notification_topic)
        if source == SNAPSHOT:
            return self._start_snapshot(job, lows, live_next, late)
        self.ch.execute(
            self.ch.topology.create_database(self.job_store.shadow_prefix(job) + job.schema)
        )
        self.job_store.checkpoints(job).create()
        self.job_store.record(job, CATCHING_UP)
        log.info(
            "rebuilding %s from %s offset 0 into %s", table, job.topic, self.job_store.shadow(job)
        )
        return job

    def _start_snapshot(
        self,
        job: ReplicaRebuild,
        lows: dict[int, int],
        live_next: LiveNext | None,
        late: dict[int, int],
    ) -> ReplicaRebuild:
        """S1 and S2."""
        if not self.source_dsn:
            raise RebuildRefused(
                "a rebuild from a snapshot asks Debezium through the signal table "
                "and compares with Postgres, and no source database is "
                "configured (PROJECTOR_SOURCE_DSN, or the connector's PG_* / "
                "CDC_* variables)"
            )
        if not self.notification_topic or self.schemas is None or live_next is None:
            raise RebuildRefused("a rebuild from a snapshot runs in the projector")
        self._keyed_replica(job)
        job.source = SNAPSHOT
        job.state = SNAPSHOTTING
        partitions = sorted(lows)
        live = live_next([(job.topic, p) for p in partitions])
        # S1. From the live position (or the earliest offset Kafka still has: a snapshot covers
        # what retention removed; the live table is then missing it too).
        start = {p: max(live.get((job.topic, p)) or 0, lows[p]) for p in partitions}
        self.ch.execute(
            self.ch.topology.create_database(self.job_store.shadow_prefix(job) + job.schema)
        )
        self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {self.job_store.shadow(job)}"
            f"{self.ch.topology.on_cluster()} AS {self.job_store.live(job)}"
        )
        store = self.job_store.checkpoints(job)
        store.create()
        for p, offset in start.items():
            if offset > 0:  # [0, offset) counts as applied: the shadow reads from `offset`
                store.record(BatchRange(job.topic, p, 0, offset - 1), DONE)
        notes_end = self.topics.end_offsets(self.notification_topic).get(0, 0)
        job.snapshot = {
            "signal": f"projector-rebuild-{job.id}",
            "notifications_from": notes_end,
            "start": {str(p): o for p, o in start.items()},
        }
        why = f"Kafka no longer holds its whole history (earliest offsets {late}); " if late else ""
        self.job_store.record(job, SNAPSHOTTING, f"{why}rebuilding from a Debezium snapshot")
        self._ask_for_snapshot(job)  # S2, after the record: asked again on resume, harmlessly
        log.info(
            "rebuilding %s from a Debezium snapshot into %s (from %s offsets %s)",
            job.table,
            self.job_store.shadow(job),
            job.topic,
            start,
        )
        return job

    def _keyed_replica(self, job: ReplicaRebuild) -> None:
        """Refuse a snapshot of a table with no replica, or with no key."""
        live_database, name = self.replica_prefix + job.schema, job.name
        engine = self.ch.rows(
            f"SELECT engine FROM system.tables WHERE database = "
            f"{quote(live_database)} AND name = {quote(name)}"
        )
        if not engine:
            raise RebuildRefused(f"no replica table {live_database}.{name} to rebuild")
        if "Replacing" not in engine[0]["engine"]:
            raise RebuildRefused(
                f"{job.table} has no primary key: Debezium's incremental snapshot "
                "reads a table by its key, and its replica keeps every event"
            )

    def _ask_for_snapshot(self, job: ReplicaRebuild) -> None:
        """S2: once per process per job; the signal's id makes a repeat a no-op."""
        if job.id in self._asked:
            return
        import psycopg

        from connectors import request_incremental_snapshot

        try:
            with psycopg.connect(str(self.source_dsn), autocommit=True, connect_timeout=10) as conn:
                request_incremental_snapshot(
                    conn,
                    [job.table],
                    job.snapshot["signal"],
                    job.where or None,
                    publication=self.publication,
                )
        except psycopg.OperationalError as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SourceUnavailable(
                f"cannot ask Postgres for a snapshot of {job.table}: {first_line}"
            ) from exc
        self._asked.add(job.id)

    # ---- between batches ----

    def step(
        self,
        job: ReplicaRebuild,
        live_next: Callable[[list[tuple[str, int]]], dict[tuple[str, int], int | None]],
    ) -> bool:
        """Move every partition of the shadow at most one chunk towards the live position
        (`live_next`: per partition, the next offset the live table applies; call with no batch
        in flight). True when the shadow is caught up."""
        if job.where:
            return self.partial.step(job, live_next)
        if job.state == SNAPSHOTTING:
            self._ask_for_snapshot(job)  # S2 (a no-op when asked before)
            progress = self.notifications.progress(job)  # S4
            if progress.failed:
                raise RebuildRefused(progress.failed)
            if progress.done:
                # The reads are in the topic (the module docstring): whatever is in it now
                # includes them.
                ends = self.topics.end_offsets(job.topic)
                job.snapshot["end"] = {str(p): o for p, o in ends.items()}
                self.job_store.record(
                    job,
                    CATCHING_UP,
                    f"Debezium read {job.table} whole "
                    f"({progress.rows} rows); catching up to {ends}",
                )
                log.info(
                    "rebuilding %s: Debezium's snapshot read it whole (%s rows); the shadow "
                    "catches up to %s",
                    job.table,
                    progress.rows,
                    ends,
                )
        partitions = self.topics.partitions(job.topic)
        keys = [(job.topic, p) for p in partitions]
        live = live_next(keys)
        checkpoints = self.job_store.checkpoints(job).load(keys)
        # S5: a snapshot rebuild is caught up only past the end of the snapshot's reads.
        snapshot_end = job.snapshot.get("end", {}) if job.source == SNAPSHOT else {}
        caught_up = job.state != SNAPSHOTTING
        for key in keys:
            target = live.get(key) or 0
            checkpoint = checkpoints.get(key)
            if checkpoint is not None and checkpoint.state == INTENT:
                self.shadows.apply_chunk(
                    job, key[1], checkpoint.first, checkpoint.last + 1
                )  # replay
                checkpoint = self.job_store.checkpoints(job).load([key]).get(key)
            shadow_next = 0 if checkpoint is None else checkpoint.resume_offset
            if shadow_next < target:
                end = min(target, shadow_next + self.chunk_messages)
                self.shadows.apply_chunk(job, key[1], shadow_next, end)
                # The live table does not move during a step: reaching it is being caught up.
                caught_up = caught_up and end == target
            if target < int(snapshot_end.get(str(key[1]), 0)):
                caught_up = False  # the live table has not applied the snapshot's end yet
        if caught_up and job.state == CATCHING_UP and job.source == SNAPSHOT:
            # S5 compares with Postgres *now*: not while the pipeline is far behind Kafka.
            ends = self.topics.end_offsets(job.topic)
            self.rounds.behind(
                job.id, sum(max(0, ends.get(k[1], 0) - (live.get(k) or 0)) for k in keys)
            )
        return caught_up

    def fail(self, job: ReplicaRebuild, reason: str) -> None:
        """Stop the job (nothing is exchanged; its shadow stays to look at)."""
        self.job_store.record(job, FAILED, reason)

    def finish_step(self, job: ReplicaRebuild, caught_up: bool) -> str | None:
        """After a step: a caught-up job still catching up is verified and swapped in."""
        if job.state != CATCHING_UP or not caught_up:
            return None
        if job.where:
            return self.partial.finish(job)
        if job.source == SNAPSHOT:
            return self._finish_snapshot(job)
        drift = self.shadows.compare_with_live(job)
        if drift:
            self.job_store.record(job, FAILED, drift)
            return f"rebuild of {job.table} failed verification (not swapped): {drift}"
        self.shadows.exchange(job)
        kept = self.job_store.shadow(job)
        self.job_store.record(job, SWAPPED, f"previous table kept as {kept}")
        return f"{job.table} rebuilt from Kafka and swapped in (previous kept: {kept})"

    def _finish_snapshot(self, job: ReplicaRebuild) -> str | None:
        """S5: the shadow against Postgres in rounds (projector/operations/postgres_rounds.py),
        then against the live table for the report, then the exchange. None while unsettled."""
        outcome = self.rounds.round(
            job.id, f"rebuild of {job.table}", partial(self.shadows.compare_with_postgres, job)
        )
        if outcome.failed:
            self.job_store.record(job, FAILED, outcome.failed)
            return f"rebuild of {job.table} failed verification (not swapped): {outcome.failed}"
        if not outcome.equal:
            return None
        against_live = self.shadows.compare_with_live(job)
        self.shadows.exchange(job)
        live_note = (
            f"; it differed from the live table ({against_live})"
            if against_live
            else "; equal to the live table"
        )
        detail = (
            f"verified against Postgres ({outcome.rows} rows){live_note}; previous table kept as "
            f"{self.job_store.shadow(job)}"
        )
        self.job_store.record(job, SWAPPED, detail)
        return f"{job.table} rebuilt from a Debezium snapshot and swapped in: {detail}"

    def rollback(self, job: ReplicaRebuild) -> str:
        """Exchange back (the caller caught the job up first)."""
        self.shadows.exchange(job)
        state = ROLLED_BACK if job.state == SWAPPED else SWAPPED
        self.job_store.record(job, state, f"the other table kept as {self.job_store.shadow(job)}")
        return f"{job.table}: {'previous' if state == ROLLED_BACK else 'rebuilt'} table serving"

    def drop_old(self, job: ReplicaRebuild) -> str:
        self.ch.execute(f"DROP TABLE IF EXISTS {self.job_store.shadow(job)}")
        self.ch.execute(
            f"DROP DATABASE IF EXISTS {ident(self.job_store.shadow_prefix(job) + job.schema)}"
        )
        self.job_store.record(job, DROPPED)
        return f"{job.table}: dropped {self.job_store.shadow(job)}"

    def forget(self, job: ReplicaRebuild) -> None:
        """Drop what this process holds about `job` (it failed, or ended)."""
        self._asked.discard(job.id)
        self.rounds.forget(job.id)
        self.notifications.forget(job.id)
        self.topics.close_readers(job.topic)  # its reading threads

    def close(self) -> None:
        self.topics.close()


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
        source, where = parse_options(request.options)
        job = rebuilds.start(request.target, request.id, source, live_next, where)
        origin = "a Debezium snapshot" if job.source == SNAPSHOT else "Kafka"
        line = f"rebuilding {request.target} from {origin} (job {job.id})"
        return TAKEN, job.id, line + (f": {job.detail}" if job.detail else "")
    kept = [j for j in rebuilds.job_store.jobs((SWAPPED, ROLLED_BACK)) if j.table == request.target]
    if not kept:
        raise RebuildRefused(
            f"{request.target} keeps no previous table (never rebuilt, or dropped with --drop-old)"
        )
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


def rebuild_options(source: str, where: str = "") -> str:
    """A replica rebuild request's options: where from, and a partial re-read's condition
    (last, on a line of its own: a condition may hold commas)."""
    return f"from-{source}" + (f"\nwhere={where}" if where else "")


def parse_options(options: str) -> tuple[str, str]:
    """(where a request asks to rebuild from, the condition of a partial re-read or "")."""
    head, _, where = options.partition("\nwhere=")
    for option in head.split(","):
        if option.startswith("from-"):
            return option[len("from-") :], where
    return KAFKA, where  # requests from before --from snapshot existed
