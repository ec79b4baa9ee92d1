"""The analysts' views: for every replica, its current rows with no `FINAL` to remember and no
metadata columns (docs/analysts.md); for a table whose delete policy keeps deleted rows, those
too, flagged; for a `history` table, every version with its validity interval
(projector/replicas/delete_policy.py)."""

from __future__ import annotations

from collections.abc import Collection

from projector.clickhouse import ClickHouse, ident
from projector.replicas.catalog import INPUT_SUFFIX, META_COLUMNS, ReplicaTable
from projector.replicas.delete_policy import HISTORY_VIEW_SUFFIX


class AnalystViews:
    """For every replica, a view of its current rows for analysts and BI tools:
    `<view prefix><schema>.<table>` = the source table's columns, one row per live key, no
    `FINAL` to remember and no metadata columns (an append-only replica: every row). Kept with
    the replica's shape: (re)made when `ensure` creates or changes the table, and the first time
    a process meets it. docs/analysts.md."""

    def __init__(self, ch: ClickHouse, prefix: str, reserved: Collection[str] = ()) -> None:
        """`reserved`: databases a view never goes to (the control and read-model databases)."""
        self.ch, self.prefix = ch, prefix
        self.reserved = {*reserved, "system", "information_schema", "INFORMATION_SCHEMA"}
        self._shapes: dict[str, tuple[str, ...]] = {}  # view → the columns it was made with

    def database_for(self, source_schema: str) -> str:
        return f"{self.prefix}{source_schema}"

    def keep(self, source_schema: str, replica: ReplicaTable) -> None:
        database = self.database_for(source_schema)
        if database in self.reserved or database == replica.database:
            return
        view = f"{ident(database)}.{ident(replica.name)}"
        columns = tuple(
            name
            for name in replica.columns
            if name not in META_COLUMNS and not name.endswith(INPUT_SUFFIX)
        )
        shape = (replica.delete_policy, *columns)
        if self._shapes.get(view) == shape:
            return
        selected = ", ".join(ident(c) for c in columns)
        if replica.append_only:
            rows = f"SELECT {selected} FROM {replica.qualified}"
        elif replica.keeps_deleted_rows:  # soft, history: deleted rows shown as such
            rows = soft_view(replica.qualified, replica.key_columns, list(columns))
        else:
            rows = f"SELECT {selected} FROM {replica.qualified} FINAL WHERE NOT _is_deleted"
        topology = self.ch.topology
        self.ch.execute(topology.create_database(database))
        self.ch.execute(topology.create_or_replace_view(view, rows))
        if replica.history is not None:
            self.ch.execute(
                topology.create_or_replace_view(
                    f"{ident(database)}.{ident(replica.name + HISTORY_VIEW_SUFFIX)}",
                    history_view(replica.history, replica.key_columns, list(columns)),
                )
            )
        self._shapes[view] = shape


def soft_view(replica: str, keys: list[str], columns: list[str]) -> str:
    """Each key's newest row, a deletion marker included: the source's live rows with
    `_deleted = 0`, its deleted ones with `_deleted = 1` and the deletion's commit time."""
    key_list = ", ".join(ident(k) for k in keys)
    values = [c for c in columns if c not in keys]
    latest = ", ".join([*(ident(c) for c in values), "_is_deleted", "_commit_ts"])
    picked = ", ".join(
        f"tupleElement(__latest, {n}) AS {ident(c)}" for n, c in enumerate(values, start=1)
    )
    deleted = len(values) + 1
    return (
        f"SELECT {key_list}{', ' if picked else ''}{picked}, "
        f"tupleElement(__latest, {deleted}) AS _deleted, "
        f"if(_deleted = 1, toNullable(tupleElement(__latest, {deleted + 1})), NULL) AS _deleted_at "
        f"FROM (SELECT {key_list}, argMax(tuple({latest}), _version) AS __latest "
        f"FROM {replica} GROUP BY {key_list})"
    )


def history_view(history: str, keys: list[str], columns: list[str]) -> str:
    """Every version of every row with its validity interval by source commit: from its commit
    to the next version's (a change or the delete), NULL while current."""
    key_list = ", ".join(ident(k) for k in keys)
    selected = ", ".join(ident(c) for c in columns)
    return (
        f"SELECT {selected}, _commit_ts AS _valid_from, _valid_to, _lsn, _op "
        f"FROM (SELECT {selected}, _commit_ts, _lsn, _op, _is_deleted, "
        f"leadInFrame(toNullable(_commit_ts)) OVER (PARTITION BY {key_list} ORDER BY _version "
        f"ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING) AS _valid_to FROM {history} FINAL) "
        "WHERE NOT _is_deleted"
    )
