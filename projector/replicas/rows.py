"""Writing rows to a replica table: a batch's rows, and deletion markers written inside
ClickHouse for a truncate or a re-snapshot's ghosts; which values are Debezium's TOAST
placeholders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.replicas.catalog import (
    INPUT_SUFFIX,
    TOAST_PLACEHOLDER,
    TOAST_PLACEHOLDER_BYTES,
    ReplicaTable,
)


def is_toast_placeholder(value: Any) -> bool:
    if value in (TOAST_PLACEHOLDER, TOAST_PLACEHOLDER_BYTES):
        return True
    return isinstance(value, list) and any(is_toast_placeholder(v) for v in value)


def insert_rows(
    ch: ClickHouse, replica: ReplicaTable, rows: Iterable[dict[str, Any]], token: str
) -> int:
    """The rows into the replica, and into its history table first (`history` policy; its own
    token: a table's token is named after it)."""
    batch = list(rows)
    if not batch:
        return 0
    columns = sorted({c for row in batch for c in row})
    if replica.history is not None:
        ch.execute(insert_statement(replica.history, columns, batch, f"{token}.history"))
    ch.execute(insert_statement(replica.qualified, columns, batch, token))
    return len(batch)


# Deletion markers are streamed in small blocks on one thread: flat memory on the embedded engine
# too, whatever the table's size.
MARKER_STREAMING = (
    "max_block_size = 65536, max_insert_block_size = 65536, min_insert_block_size_rows = 65536, "
    "min_insert_block_size_bytes = 0, max_threads = 1"
)


def insert_deletion_markers(
    ch: ClickHouse, replica: ReplicaTable, marker: dict[str, Any], below: int, live_only: bool
) -> None:
    """Insert, inside ClickHouse (no key travels through Python), a deletion marker with the
    metadata `marker` for every key of a keyed replica that has a row with a version below
    `below` (a truncate's), or, `live_only`, whose newest row is below `below` and is not a
    deletion (a re-snapshot's ghosts, projector/replicas/snapshot_sweep.py).

    The markers carry no deduplication token, on purpose: they are idempotent (same key, same
    version, same content), and the set of keys they cover may differ between a first attempt
    and a replay (merges may by then have folded a key's older rows into its marker), so
    token-ed blocks of a replay could be dropped wrongly. Without `live_only` there is no FINAL
    and no DISTINCT: a key with several versions gets several identical markers, which merge
    into one. With it, FINAL keeps each key's newest row and drops deleted keys *before* the
    version filter: the filter must not become a PREWHERE, which would run before the merge
    (`optimize_move_to_prewhere_if_final = 0`, ClickHouse's default, stated here because the
    result depends on it)."""
    keys = [ident(k) for k in replica.key_columns]
    if replica.keeps_deleted_rows:
        # soft, history (projector/replicas/delete_policy.py): the marker carries the row's last
        # values, so it is made from the key's newest row (FINAL: one marker per live key; the
        # keys whose newest row is at or past `below` need none, it wins over the marker)
        keys += [
            ident(c)
            for c in replica.columns
            if c not in replica.key_columns and c not in marker and not c.endswith(INPUT_SUFFIX)
        ]
        live_only = True
    columns = ", ".join(keys + [ident(c) for c in marker])
    # Positional, no aliases: an alias `… AS _version` would shadow the column in WHERE.
    values = ", ".join(_sql_literal(v) for v in marker.values())
    final, settings = "", MARKER_STREAMING
    if live_only:
        final, settings = " FINAL", f"{settings}, optimize_move_to_prewhere_if_final = 0"
    # Into the history table first: the replica's markers hide the rows they are made from.
    # (A replay's second copy there is the same key and version: one row.)
    for target in [t for t in (replica.history, replica.qualified) if t is not None]:
        ch.execute(
            f"INSERT INTO {target} ({columns}) SETTINGS insert_deduplicate = 0 "
            f"SELECT {', '.join(keys)}, {values} FROM {replica.qualified}{final} "
            f"WHERE _version < {int(below)} SETTINGS {settings}"
        )


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    return quote(str(value))
