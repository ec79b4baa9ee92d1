"""Re-reading the rows of a replica table that match a Postgres condition:
`projector rebuild SCHEMA.TABLE --from snapshot --where "<condition>"`.

When a few rows went wrong (a range of keys a bug touched, rows a manual fix changed while
capture was off), reading the whole table again is more than needed. Debezium's incremental
snapshot takes additional conditions: it reads only the matching rows, as `r` events in the
table's own topic, each at a place in the topic where it is valid (the DBLog argument of
projector/operations/replica_rebuild.py). The running projector applies them to the live table
like any other event, and keeps the read models fed by it in the same batches. No shadow table,
nothing exchanged, nothing to roll back. In order:

  R1. The condition is tried in Postgres first: a read-only transaction counts the matching rows.
      A condition Postgres refuses is refused here, with Postgres' reason, before Debezium sees
      it (Debezium would fail the snapshot, or the connector).
  R2. The job is recorded `snapshotting` with the condition, the live table's position, the end
      N0 of Debezium's notification topic and the signal id `projector-reread-<job>`; the snapshot
      is asked for under that id (asked again after a crash: a no-op, as in S2).
  R3. The notification topic from N0 says when the matching rows have been read
      (TABLE_SCAN_COMPLETED, projector/operations/snapshot_notifications.py): the topic's end
      offsets E are recorded, `catching-up`.
  R4. Once the live table has applied past E, the matching rows of Postgres are compared with
      the live replica, a chunk of keys at a time in one REPEATABLE READ snapshot, in rounds
      while writes go on (projector/operations/postgres_rounds.py). Equal: `re-read`; keys that
      still differ: `failed`, naming them.

What it cannot do: remove rows the replica holds that Postgres no longer has (a delete that never
arrived). The condition is Postgres SQL, and ClickHouse cannot tell which of its rows would match
it; Debezium reads rows that exist. `projector verify SCHEMA.TABLE` names such rows (`clickhouse
only`), and a rebuild without `--where` leaves them behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from projector.clickhouse import ClickHouse, literal_chunks, quote
from projector.config import ProjectorConfig
from projector.errors import RebuildRefused, SourceUnavailable, VerifyError
from projector.operations.postgres_rounds import ComparisonRounds
from projector.operations.rebuild_topics import RebuildTopics
from projector.operations.replica_rebuild_jobs import (
    CATCHING_UP,
    FAILED,
    REREAD,
    SNAPSHOT,
    SNAPSHOTTING,
    ReplicaRebuild,
    ReplicaRebuildJobs,
)
from projector.operations.snapshot_notifications import SnapshotNotifications
from projector.operations.verify import Drift, PostgresSnapshot, TableVerifier, differences
from projector.operations.verify_plan import TablePlan, pg_ident

log = logging.getLogger("projector.replica_rebuild")

LiveNext = Callable[[list[tuple[str, int]]], dict[tuple[str, int], int | None]]

CHUNK_ROWS = 10_000  # R4: matching rows compared per round trip
CONDITION_TIMEOUT = "60s"  # R1: how long counting the matching rows may take


def count_matching(source_dsn: str, table: str, where: str) -> int:
    """R1: the rows of `table` (SCHEMA.TABLE) matching `where` in Postgres now, counted in a
    read-only transaction. RebuildRefused with Postgres' reason when it refuses the condition."""
    import psycopg

    schema, name = table.split(".", 1)
    try:
        with psycopg.connect(source_dsn, connect_timeout=10) as conn:
            conn.read_only = True
            conn.execute(f"SET LOCAL statement_timeout = '{CONDITION_TIMEOUT}'")
            row = conn.execute(
                f"SELECT count(*) FROM {pg_ident(schema)}.{pg_ident(name)} "
                f"WHERE ({_escaped(where)})",
                (),
            ).fetchone()
    except psycopg.OperationalError as exc:
        raise SourceUnavailable(
            f"cannot try the condition in Postgres: {_first_line(exc)}"
        ) from exc
    except psycopg.Error as exc:
        raise RebuildRefused(
            f"Postgres refused the condition {where!r}: {_first_line(exc)}"
        ) from exc
    assert row is not None
    return int(row[0])


class PartialRereads:
    """R1-R4 for the jobs with a condition; the rest of a job's life is ReplicaRebuilds'."""

    def __init__(
        self,
        ch: ClickHouse,
        job_store: ReplicaRebuildJobs,
        topics: RebuildTopics,
        notifications: SnapshotNotifications,
        rounds: ComparisonRounds,
        source_dsn: str | None,
        ask_for_snapshot: Callable[[ReplicaRebuild], None],
    ) -> None:
        self.ch, self.job_store, self.topics = ch, job_store, topics
        self.notifications, self.rounds = notifications, rounds
        self.source_dsn, self.ask_for_snapshot = source_dsn, ask_for_snapshot

    def start(
        self,
        job: ReplicaRebuild,
        where: str,
        live: dict[tuple[str, int], int | None],
        notification_topic: str,
    ) -> ReplicaRebuild:
        """R1 and R2 (`live`: the live table's next offset per partition)."""
        if not self.source_dsn:
            raise RebuildRefused(
                "a partial re-read asks Debezium through the signal table and compares with "
                "Postgres, and no source database is configured (PROJECTOR_SOURCE_DSN, or the "
                "connector's PG_* / CDC_* variables)"
            )
        if not where.strip():
            raise RebuildRefused("--where needs a condition")
        matching = count_matching(self.source_dsn, job.table, where)  # R1
        job.source, job.state = SNAPSHOT, SNAPSHOTTING
        job.snapshot = {
            "signal": f"projector-reread-{job.id}",
            "notifications_from": self.topics.end_offsets(notification_topic).get(0, 0),
            "where": where,
            "matching": matching,
            "start": {str(p): o or 0 for (_, p), o in live.items()},
        }
        self.job_store.record(job, SNAPSHOTTING, f"re-reading the {matching} row(s) where {where}")
        self.ask_for_snapshot(job)  # after the record: asked again on resume, harmlessly
        log.info(
            "re-reading the %d row(s) of %s where %s through a Debezium snapshot",
            matching,
            job.table,
            where,
        )
        return job

    def step(self, job: ReplicaRebuild, live_next: LiveNext) -> bool:
        """R2-R3 while snapshotting; then whether the live table has applied past E."""
        if job.state == SNAPSHOTTING:
            self.ask_for_snapshot(job)  # a no-op when asked before
            progress = self.notifications.progress(job)
            if progress.failed:
                raise RebuildRefused(progress.failed)
            if not progress.done:
                return False
            ends = self.topics.end_offsets(job.topic)
            job.snapshot["end"] = {str(p): o for p, o in ends.items()}
            detail = (
                f"Debezium read the rows where {job.where} ({progress.rows} rows); the live "
                f"table catches up to {ends}"
            )
            self.job_store.record(job, CATCHING_UP, detail)
            log.info("re-read of %s: %s", job.table, detail)
        if job.state != CATCHING_UP:
            return False  # ended (re-read or failed) since the job list was read
        partitions = self.topics.partitions(job.topic)
        live = live_next([(job.topic, p) for p in partitions])
        applied = {p: live.get((job.topic, p)) or 0 for p in partitions}
        kafka_end = self.topics.end_offsets(job.topic)
        self.rounds.behind(
            job.id, sum(max(0, kafka_end.get(p, 0) - applied[p]) for p in partitions)
        )
        read_end = job.snapshot.get("end", {})
        return all(applied[p] >= int(read_end.get(str(p), 0)) for p in partitions)

    def finish(self, job: ReplicaRebuild) -> str | None:
        """R4, once caught up: None while unsettled."""
        outcome = self.rounds.round(job.id, f"re-read of {job.table}", partial(self.compare, job))
        if outcome.failed:
            self.job_store.record(job, FAILED, outcome.failed)
            return f"re-read of {job.table} where {job.where} failed verification: {outcome.failed}"
        if not outcome.equal:
            return None
        detail = f"{outcome.rows} row(s) where {job.where} re-read and equal to Postgres"
        self.job_store.record(job, REREAD, detail)
        return f"{job.table}: {detail}"

    def compare(self, job: ReplicaRebuild, keys: list[str] | None) -> tuple[int, list[str]]:
        """The live replica against Postgres in a fresh snapshot: the rows matching the job's
        condition, or only `keys` (verify's key texts) when given. (Rows compared, keys that
        differ.)"""
        config = ProjectorConfig(
            replica_prefix=self.job_store.replica_prefix,
            control_database=self.job_store.control_database,
            transaction_metadata=False,
        )
        postgres = PostgresSnapshot(str(self.source_dsn))
        try:
            verifier = TableVerifier(config, self.ch, postgres, projector_may_run=False)
            plan = verifier.plan(job.table)
            if isinstance(plan, str):
                raise VerifyError(f"{job.table} cannot be compared with Postgres: {plan}")
            if keys is not None:  # compare_now takes a new snapshot; the count is in it
                _, drift = verifier.compare_now(plan, keys)
                ((matching,),) = postgres.rows(
                    f"SELECT count(*) FROM {plan.source} WHERE ({_escaped(job.where)})"
                )
                return int(matching), sorted(drift)
            postgres.renew()
            rows, found = self._compare_matching(plan, postgres, job.where)
            return rows, sorted(found)
        finally:
            postgres.close()

    def _compare_matching(
        self, plan: TablePlan, postgres: PostgresSnapshot, where: str
    ) -> tuple[int, dict[str, Drift]]:
        """Postgres' rows matching `where`, read through a server-side cursor a chunk at a
        time, each chunk against the replica's rows of the same keys."""
        names = [c.name for c in plan.columns]
        ch_key = plan.key_text("clickhouse")
        ch_columns = ", ".join(plan.column_texts("clickhouse"))
        drift: dict[str, Drift] = {}
        rows = 0
        with postgres.conn.cursor(name="projector_partial_reread") as cursor:
            cursor.execute(
                f"SELECT {plan.key_text('postgres')}, {', '.join(plan.column_texts('postgres'))} "
                f"FROM {plan.source} WHERE ({_escaped(where)})",
                (),
            )
            while chunk := cursor.fetchmany(CHUNK_ROWS):
                source = {row[0]: dict(zip(names, row[1:], strict=True)) for row in chunk}
                replica: dict[str, dict[str, Any]] = {}
                for group in literal_chunks(list(source), quote):
                    for row in self.ch.rows(
                        f"SELECT {ch_key} AS __key, {ch_columns} FROM {plan.replica} FINAL "
                        f"WHERE {ch_key} IN ({', '.join(map(quote, group))})"
                    ):
                        replica[row.pop("__key")] = row
                drift.update(differences(plan, source, replica))
                rows += len(chunk)
        return rows, drift


def _escaped(where: str) -> str:
    """The condition inside a query sent with parameters (psycopg reads `%` as a placeholder)."""
    return where.replace("%", "%%")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
