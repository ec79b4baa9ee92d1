"""Debezium's notifications of an incremental snapshot: has the table been read whole? (S4)

A rebuild from a snapshot (projector/operations/replica_rebuild.py, S1-S5) asks Debezium for an
incremental snapshot of one table and waits, before it catches up and compares, until the
notification topic says the table was read whole by a scan that began after the request.
`snapshot_progress` is that reading of the notifications (pure, unit-tested);
`SnapshotNotifications` reads them from the topic, from N0 on, for each job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from projector.operations.rebuild_topics import RebuildTopics
from projector.operations.replica_rebuild_jobs import ReplicaRebuild
from schemas.registry import SchemaCache

log = logging.getLogger("projector.replica_rebuild")

# TABLE_SCAN_COMPLETED statuses of a table read whole (the others: Debezium could not read it)
SCANNED = ("SUCCEEDED", "EMPTY")


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
                    return SnapshotProgress(failed=f"Debezium could not snapshot {table}: {status}")
                return SnapshotProgress(done=True, rows=int(rows) if rows else None)
            began_after = True  # that scan began before N0; the one asked for comes next
            continue
        if kind == "IN_PROGRESS" and _same_table(data.get("current_collection_in_progress"), table):
            at = str(data.get("last_processed_key") or "")
            continue
        if kind == "ABORTED":
            stopped = [c for c in str(data.get("data_collections") or "").split(",") if c]
            if not stopped or any(_same_table(c, table) for c in stopped):
                return SnapshotProgress(
                    failed=f"Debezium's snapshot of {table} was stopped (ABORTED)"
                )
        began_after = True
    return SnapshotProgress(at=at if began_after else "")


class SnapshotNotifications:
    """The notification topic as each job reads it: from its N0, read on from where this
    process left off."""

    def __init__(self, topics: RebuildTopics, topic: str, schemas: SchemaCache | None) -> None:
        """`schemas` decode the notifications (None: no rebuild from a snapshot here)."""
        self.topics = topics
        self.topic = topic
        self.schemas = schemas
        self._read: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # per job: next offset, read

    def progress(self, job: ReplicaRebuild) -> SnapshotProgress:
        """S4: Debezium's notifications since the request, read on from where this process
        left off (from N0 after a restart)."""
        topic = self.topic
        start = int(job.snapshot.get("notifications_from", 0))
        offset, notes = self._read.get(job.id, (start, []))
        end = self.topics.end_offsets(topic).get(0, 0)
        if end > offset:
            assert self.schemas is not None
            for message in self.topics.reader(topic, 0).read(offset, end).messages:
                value = message.value()
                if value:
                    try:
                        notes.append(self.schemas.decode(value)[1])
                    except Exception as exc:  # not Debezium's: nothing to learn from it
                        log.warning("skipping an undecodable record of %s: %s", topic, exc)
            offset = end
        self._read[job.id] = (offset, notes)
        return snapshot_progress(notes, job.table)

    def forget(self, job_id: str) -> None:
        """Drop what was read for a job (it failed, or ended)."""
        self._read.pop(job_id, None)
