"""Which of Debezium's notifications end the snapshot a rebuild asked for (S4 of
projector/operations/replica_rebuild.py, read by projector/operations/snapshot_notifications.py):
the first scan of the table that began after the request."""

from __future__ import annotations

from typing import Any

from projector.operations.snapshot_notifications import snapshot_progress

TABLE = "public.stock"


def note(kind: str, **data: str) -> dict[str, Any]:
    return {"aggregate_type": "Incremental Snapshot", "type": kind, "additional_data": data}


def scanned(table: str = TABLE, status: str = "SUCCEEDED", rows: str = "10") -> dict[str, Any]:
    return note(
        "TABLE_SCAN_COMPLETED", scanned_collection=table, status=status, total_rows_scanned=rows
    )


def in_progress(table: str = TABLE, key: str = "5") -> dict[str, Any]:
    return note("IN_PROGRESS", current_collection_in_progress=table, last_processed_key=key)


def test_a_snapshot_started_after_the_request_ends_at_the_tables_scan() -> None:
    notes = [note("STARTED", data_collections=TABLE), in_progress(key="2048")]
    assert not snapshot_progress(notes, TABLE).done
    assert snapshot_progress(notes, TABLE).at == "2048"
    done = snapshot_progress([*notes, scanned(rows="4096"), note("COMPLETED")], TABLE)
    assert done.done and done.rows == 4096


def test_a_scan_of_the_table_already_running_is_not_the_one_asked_for() -> None:
    # At the request the table was being scanned (for someone else): rows read before the
    # shadow's start. Debezium appends the table again for the request; that scan counts.
    running = [in_progress(), scanned()]
    assert not snapshot_progress(running, TABLE).done
    assert snapshot_progress([*running, in_progress(), scanned(rows="7")], TABLE).rows == 7


def test_another_tables_progress_first_means_the_tables_scan_begins_after() -> None:
    notes = [in_progress("public.other"), scanned("public.other"), in_progress(), scanned()]
    assert snapshot_progress(notes, TABLE).done
    assert not snapshot_progress([scanned("public.other")], TABLE).done


def test_an_empty_table_is_read_whole_and_failures_are_named() -> None:
    assert snapshot_progress([note("STARTED"), scanned(status="EMPTY", rows="0")], TABLE).done
    failed = snapshot_progress([note("STARTED"), scanned(status="NO_PRIMARY_KEY")], TABLE)
    assert not failed.done and "NO_PRIMARY_KEY" in failed.failed
    stopped = snapshot_progress([note("STARTED"), note("ABORTED")], TABLE)
    assert "stopped" in stopped.failed
    others = snapshot_progress(
        [note("STARTED"), note("ABORTED", data_collections="public.x")], TABLE
    )
    assert not others.failed


def test_a_catalog_before_the_name_is_the_same_table() -> None:
    assert snapshot_progress([note("STARTED"), scanned("shopdb.public.stock")], TABLE).done
