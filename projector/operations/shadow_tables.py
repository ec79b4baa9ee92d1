"""What is done to a replica rebuild's shadow table: chunks applied to it (each committed like a
batch), compared with the live table and with Postgres, exchanged with the live table.

When each is done, and why that is exact, is projector/operations/replica_rebuild.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import DONE, INTENT, BatchRange
from projector.errors import RebuildRefused, VerifyError
from projector.messages import KafkaMessages
from projector.operations.rebuild_topics import RebuildTopics
from projector.operations.replica_rebuild_jobs import ReplicaRebuild, ReplicaRebuildJobs
from projector.read_models.stage import request_every_key
from projector.replicas.apply import BatchApplier
from projector.replicas.catalog import ReplicaCatalog

log = logging.getLogger("projector.replica_rebuild")

NOT_HASHED = ("_ingested_at",)  # when a row was written differs between the two tables


class ShadowTables:
    """What is done to a job's shadow table: chunks applied (each committed like a batch),
    compared with the live table and with Postgres, exchanged with the live table."""

    def __init__(
        self,
        ch: ClickHouse,
        job_store: ReplicaRebuildJobs,
        topics: RebuildTopics,
        make_applier: Callable[[ReplicaCatalog, str], BatchApplier],
        control_database: str,
        source_dsn: str | None,
    ) -> None:
        self.ch = ch
        self.job_store = job_store
        self.topics = topics
        self.make_applier = make_applier
        self.replica_prefix = job_store.replica_prefix
        self.control_database = control_database
        self.source_dsn = source_dsn
        self._appliers: dict[str, BatchApplier] = {}

    def apply_chunk(self, job: ReplicaRebuild, partition: int, first: int, end: int) -> None:
        """Apply offsets [first, end) of one partition to the shadow, committed like a batch."""
        applier = self._applier(job)

        def plan(messages: list[Any]) -> tuple[KafkaMessages, Any]:
            read = KafkaMessages(messages)
            return read, applier.plan(read)

        chunk = self.topics.reader(job.topic, partition, plan).read(first, end)
        batch = BatchRange(job.topic, partition, first, end - 1)
        store = self.job_store.checkpoints(job)
        if not chunk.messages:  # only gaps (transaction markers, compaction)
            store.record(batch, DONE)
            return
        store.record(batch, INTENT)
        log.info("rebuilding %s: %s[%d] %d-%d", job.table, job.topic, partition, first, end - 1)
        messages, segments = chunk.prepared or (KafkaMessages(chunk.messages), None)
        # Dead letters were recorded when the live table met them: the shadow drops them alike.
        outcome = applier.apply(
            batch,
            messages,
            lambda _batch, _letters: None,
            segments,
            planned=chunk.prepared is not None,
        )
        if outcome.stop is not None:  # the live table stops on it too: rebuild from a snapshot
            raise RebuildRefused(f"{job.table}: {outcome.stop}")
        store.record(batch, DONE)

    def _applier(self, job: ReplicaRebuild) -> BatchApplier:
        if job.id not in self._appliers:
            # No re-reads from Postgres: the live table asked for them when it met the events.
            catalog = ReplicaCatalog(self.ch, self.job_store.shadow_prefix(job))
            self._appliers[job.id] = self.make_applier(catalog, f"replica_rebuild:{job.id}")
        return self._appliers[job.id]

    def compare_with_live(self, job: ReplicaRebuild) -> str:
        """The two tables (caught up, no batch in flight) against each other: "" when equal."""
        sides = {}
        for label, table in (
            ("live", self.job_store.live(job)),
            ("rebuilt", self.job_store.shadow(job)),
        ):
            database, name = (p.strip("`") for p in table.split(".", 1))
            columns = [
                (r["name"], r["type"])
                for r in self.ch.rows(
                    f"SELECT name, type FROM system.columns WHERE database = {quote(database)} "
                    f"AND table = {quote(name)} ORDER BY position"
                )
            ]
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

    def exchange(self, job: ReplicaRebuild) -> None:
        """Swap the live table and the shadow database's table, in one atomic statement; then
        the read models over it recompute every key (the swapped table may lack keys the other
        had: projector/read_models/stage.py `request_every_key`)."""
        self.ch.execute(
            f"EXCHANGE TABLES {self.job_store.live(job)} AND {self.job_store.shadow(job)}"
        )
        request_every_key(self.ch, self.control_database, job.topic)

    def compare_with_postgres(
        self, job: ReplicaRebuild, keys: list[str] | None = None
    ) -> tuple[int, list[str]]:
        """The shadow against its source table in a fresh snapshot (projector/operations/verify.py): the
        rows compared and the keys (as verify's key texts) that differ; only `keys` if given."""
        from projector.config import ProjectorConfig
        from projector.operations.verify import PostgresSnapshot, TableVerifier

        config = ProjectorConfig(
            replica_prefix=self.replica_prefix,
            control_database=self.control_database,
            transaction_metadata=False,
        )
        postgres = PostgresSnapshot(str(self.source_dsn))
        try:
            verifier = TableVerifier(config, self.ch, postgres, projector_may_run=False)
            plan = verifier.plan(job.table, self.job_store.shadow_prefix(job) + job.schema)
            if isinstance(plan, str):
                raise VerifyError(f"{job.table} cannot be compared with Postgres: {plan}")
            verdict, drift = verifier.compare_now(plan, keys)
        finally:
            postgres.close()
        return verdict.postgres_rows or 0, sorted(drift)
