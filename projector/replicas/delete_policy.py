"""What a delete means, per table (`delete_policy`, env `DELETE_POLICY`): the one owner of it.

- `hard` (the default): the row is gone. The replica's deletion marker (`_is_deleted = 1`)
  hides the key under `FINAL`; the analysts' view shows the live rows only.
- `soft`: the row stays for analysts, with the time the source deleted it. The replica itself
  is unchanged for everyone else (read models, verify, rebuilds read it with `FINAL`, which
  still drops the key): its deletion marker just carries the row's last values instead of the
  key alone. ReplacingMergeTree keeps a marker as the key's newest row on every merge (only
  `CLEANUP` merges remove markers, and nothing here runs one), so the analysts' view reads each
  key's newest row, marker or not, and shows `_deleted` and `_deleted_at`.
- `history`: every version of every row, with its validity interval by source commit (a type 2
  slowly changing dimension), in a table beside the replica (`history_<schema>.<table>`, a
  database of its own so nothing that lists replicas meets it; a ReplacingMergeTree over (key,
  `_version`), so a version applied twice, by a replay or a reset, is one row) and the
  analysts' view `<schema>.<table>_history` (`_valid_from`, `_valid_to`: NULL while current).
  The replica is kept as with `soft`, so the view of current rows shows deletions too.

A TRUNCATE follows the table's policy (its markers carry each row's last values: soft-deleted,
or its version closed in the history). So does a re-snapshot's ghost sweep.

Where the values of a deleted row come from: a delete event carries only the key (unless the
table has REPLICA IDENTITY FULL), so the per-message path fills the marker from the key's row
earlier in the batch, else its newest stored row below the batch (the look-up unchanged TOAST
values use, projector/replicas/apply.py); ClickHouse's own decoding (the fast path) cannot, so
batches of a `soft` or `history` table take the per-message path. Truncate and sweep markers are
filled inside ClickHouse (projector/replicas/rows.py).
"""

from __future__ import annotations

from projector.clickhouse import ClickHouse, ident, quote
from projector.config import DeletePolicy

HISTORY_VIEW_SUFFIX = "_history"  # the analysts' view of it


def describe(table: str, policy: DeletePolicy) -> str:
    """A line of `connectors apply --dry-run`."""
    if policy == "soft":
        return (
            f"delete policy {table}: soft (deleted and truncated rows stay in the analysts' view, "
            "with _deleted and _deleted_at)"
        )
    if policy == "history":
        return (
            f"delete policy {table}: history (every version with _valid_from/_valid_to in "
            f"{table}{HISTORY_VIEW_SUFFIX}; deleted rows stay, as with soft)"
        )
    return f"delete policy {table}: hard (a deleted row is gone)"


def keeps_deleted_rows(policy: DeletePolicy) -> bool:
    """Its deletion markers carry the row's last values (soft, history)."""
    return policy != "hard"


def create_history_table(
    ch: ClickHouse, database: str, table: str, history_database: str, keys: list[str]
) -> None:
    """The history table of replica `database`.`table`, if missing: its columns as they are now
    (from then on every ALTER of the replica is done to both, projector/replicas/catalog.py), a
    ReplacingMergeTree over (key, `_version`): a version written twice is one row."""
    described = ch.rows(
        "SELECT name, type, default_kind, default_expression FROM system.columns "
        f"WHERE database = {quote(database)} AND table = {quote(table)} ORDER BY position"
    )
    defs = [
        f"{ident(r['name'])} {r['type']}"
        + (f" {r['default_kind']} {r['default_expression']}" if r["default_kind"] else "")
        for r in described
    ]
    order = "(" + ", ".join([*(ident(k) for k in keys), "_version"]) + ")"
    ch.execute(ch.topology.create_database(history_database))
    ch.execute(
        ch.topology.create_table(
            f"{ident(history_database)}.{ident(table)}", defs, "ReplacingMergeTree", "", order
        )
    )
