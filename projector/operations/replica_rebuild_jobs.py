"""A replica rebuild's job: its record, the table of records (`replica_rebuilds` in the control
database, latest row per id) and the names of the tables it builds.

What a job does, state by state, and why it is exact is projector/operations/replica_rebuild.py's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import CheckpointStore

SNAPSHOTTING, CATCHING_UP = "snapshotting", "catching-up"
SWAPPED, ROLLED_BACK, DROPPED, FAILED = "swapped", "rolled-back", "dropped", "failed"
REREAD = "re-read"  # a partial re-read (--where) ended: its rows verified, no table kept
BUILDING = (SNAPSHOTTING, CATCHING_UP)  # not swapped in yet
CHASED = (*BUILDING, SWAPPED, ROLLED_BACK)  # the shadow database's table is kept current
KAFKA, SNAPSHOT, AUTO = "kafka", "snapshot", "auto"  # where a rebuild reads from
JOB_COLUMNS = ("id", "table", "topic", "state", "detail", "source")


@dataclass
class ReplicaRebuild:
    id: str
    table: str  # SCHEMA.TABLE
    topic: str
    state: str
    detail: str = ""
    source: str = KAFKA  # KAFKA or SNAPSHOT
    # --from snapshot (S1, S4): "signal", "notifications_from" (N0), "start" and, once the table
    # is read whole, "end" (per partition, as text keys: it is stored as JSON); a partial
    # re-read's (projector/operations/partial_reread.py) "where" and "matching" too
    snapshot: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The Postgres condition of a partial re-read ("": the whole table)."""
        return str(self.snapshot.get("where") or "")

    @property
    def schema(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.table.split(".", 1)[1]


class ReplicaRebuildJobs:
    """The jobs' records, and where each job's tables are."""

    def __init__(self, ch: ClickHouse, control_database: str, replica_prefix: str) -> None:
        self.ch = ch
        self.control_database = control_database
        self.table = f"{ident(control_database)}.replica_rebuilds"
        self.replica_prefix = replica_prefix

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.control_database))
        self.ch.execute(
            topology.create_table(
                self.table,
                [
                    "id String",
                    "table String",
                    "topic String",
                    "state LowCardinality(String)",
                    "detail String",
                    "seq UInt64",
                    "recorded_at DateTime64(3) DEFAULT now64(3)",
                    f"source LowCardinality(String) DEFAULT {quote(KAFKA)}",
                    "snapshot String DEFAULT '{}'",
                ],
                "ReplacingMergeTree",
                "seq",
                "id",
                deduplicate=False,
            )
        )
        for column in (
            f"source LowCardinality(String) DEFAULT {quote(KAFKA)}",
            "snapshot String DEFAULT '{}'",
        ):  # a table from before them
            self.ch.execute(
                f"ALTER TABLE {self.table}{topology.on_cluster()} ADD COLUMN IF NOT EXISTS {column}"
            )

    def record(self, job: ReplicaRebuild, state: str, detail: str = "") -> None:
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

    # ---- where its tables are ----

    def live(self, job: ReplicaRebuild) -> str:
        return f"{ident(self.replica_prefix + job.schema)}.{ident(job.name)}"

    def shadow_prefix(self, job: ReplicaRebuild) -> str:
        return f"{self.replica_prefix}rebuild_{job.id}_"

    def shadow(self, job: ReplicaRebuild) -> str:
        return f"{ident(self.shadow_prefix(job) + job.schema)}.{ident(job.name)}"

    def checkpoints(self, job: ReplicaRebuild) -> CheckpointStore:
        return CheckpointStore(self.ch, self.control_database, f"replica_rebuild:{job.id}")
