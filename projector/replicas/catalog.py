"""Replica tables: one ClickHouse table per captured Postgres table, equal to it under `FINAL`.

Shape: the source columns (types from `schemas.type_map`) plus metadata columns, in a
`ReplacingMergeTree(_version, _is_deleted)` ordered by the full source primary key. A table
without a primary key becomes an append-only `MergeTree`.

Version arithmetic (`_version`), the argument in four steps:
  1. Debezium's single task emits changes in commit order, and a change's key decides its
     partition (a fixed partition count), so all events of one key sit in one partition in the
     order Postgres committed them. Kafka keeps that order.
  2. Postgres' row locks order the changes of one key: a transaction touching a row waits for the
     previous one's commit. Snapshot reads are placed by Debezium in the stream at the point they
     are valid (initial snapshot before streaming; incremental chunks at their high watermark,
     after dropping keys that changed inside the window).
  3. Hence the Kafka offset of an event orders the events of one key exactly as their validity:
     `_version = offset` grows per key across snapshot reads, streaming and incremental chunks.
  4. A replay re-reads the same offsets and so writes the same versions: idempotent. (Source LSNs
     would not do: an incremental snapshot read has none, and a row changed by a transaction that
     was open during a snapshot carries an LSN *older* than the snapshot point.)
  Consequence: a re-created topic, a changed partition count or a changed key schema breaks
  step 1; projector/replicas/topic_guard.py detects each and stops the table until it is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

from projector.clickhouse import ClickHouse, ident, quote
from projector.config import DeletePolicy
from projector.errors import PoisonMessage
from projector.replicas.delete_policy import create_history_table, keeps_deleted_rows
from schemas.type_map import ColumnType, UnconvertibleValue, UnsupportedType, column_type
from schemas.upcasters import NO_UPCASTER, Upcaster

# Debezium's stand-in for an unchanged TOASTed value (`unavailable.value.placeholder`).
TOAST_PLACEHOLDER = "__debezium_unavailable_value"
TOAST_PLACEHOLDER_BYTES = TOAST_PLACEHOLDER.encode()

# The metadata columns of every replica row, owned here: their types, their values from a decoded
# event (`metadata`, the per-message path) and the same values as SQL over the envelope ClickHouse
# decodes (`META_SQL`, the fast path). `_ingested_at` is ClickHouse's own.
META_COLUMNS: dict[str, str] = {
    "_version": "UInt64",
    "_is_deleted": "UInt8",
    "_op": "LowCardinality(String)",
    "_lsn": "UInt64",
    "_tx_id": "UInt64",
    "_commit_ts": "DateTime64(3, 'UTC')",
    "_partition": "Int32",
    "_offset": "Int64",
    "_ingested_at": "DateTime64(3, 'UTC') DEFAULT now64(3)",
}
META_SQL: dict[str, str] = {
    "_version": "kafka_offset",
    "_is_deleted": "toUInt8(op = 'd')",
    "_op": "op",
    "_lsn": "ifNull(tupleElement(source, 'lsn'), 0)",
    "_tx_id": "ifNull(tupleElement(source, 'txId'), 0)",
    "_commit_ts": "fromUnixTimestamp64Milli(tupleElement(source, 'ts_ms'), 'UTC')",
    "_partition": "{partition}",
    "_offset": "toInt64(kafka_offset)",
}


def metadata(op: str, source: dict[str, Any], partition: int, offset: int) -> dict[str, Any]:
    """The metadata columns of a row written for the event at `offset` (`_version` is the offset:
    the argument at the top of this module). A delete and a truncate's markers are deletions."""
    return {
        "_version": offset,
        "_is_deleted": 1 if op in ("d", "t") else 0,
        "_op": op,
        "_lsn": int(source.get("lsn") or 0),
        "_tx_id": int(source.get("txId") or 0),
        "_commit_ts": commit_ts(source),
        "_partition": partition,
        "_offset": offset,
    }


# Suffix of the EPHEMERAL input column of a column whose value ClickHouse must transform on the
# way in (bytea arrives as hex text, stored as `unhex(<column>__input)`): JSONEachRow cannot
# carry arbitrary bytes, and an ephemeral column plus a DEFAULT works the same on chDB and servers.
INPUT_SUFFIX = "__input"


@dataclass
class SourceColumn:
    name: str
    ctype: ColumnType
    default: Any = None

    @property
    def input_name(self) -> str:
        """The column an insert writes: the column itself, or its ephemeral input column."""
        return self.name + INPUT_SUFFIX if self.ctype.clickhouse_input_expr else self.name

    def stored_value(self, table: str = "") -> str:
        """SQL reading the stored column back in the form an insert takes, named like the
        column an insert writes (`input_name`): bytea as hex text into `c__input`, say. JSON
        carries no raw bytes, and a value read back must insert unchanged."""
        column = f"{table}.{ident(self.name)}" if table else ident(self.name)
        expr = self.ctype.clickhouse_output_expr
        return f"{expr.format(column) if expr else column} AS {ident(self.input_name)}"

    def definitions(self) -> list[str]:
        """Column definitions for CREATE / ALTER ... ADD COLUMN."""
        expr = self.ctype.clickhouse_input_expr
        if expr is None:
            return [f"{ident(self.name)} {self.ctype.clickhouse}{_default_clause(self)}"]
        return [
            f"{ident(self.input_name)} {self.ctype.clickhouse} EPHEMERAL",
            f"{ident(self.name)} {self.ctype.clickhouse} DEFAULT {expr.format(ident(self.input_name))}",
        ]


@dataclass
class ReplicaTable:
    database: str
    name: str
    key_columns: list[str]
    columns: dict[str, str] = field(default_factory=dict)  # existing ClickHouse name → type
    # What a delete means (projector/replicas/delete_policy.py); `history`: where every version
    # goes too (a database of its own, so nothing that lists replicas meets it)
    delete_policy: DeletePolicy = "hard"
    history_database: str | None = None

    @property
    def qualified(self) -> str:
        return f"{ident(self.database)}.{ident(self.name)}"

    @property
    def history(self) -> str | None:
        """The history table (`history` policy), qualified; None otherwise."""
        if self.delete_policy != "history" or self.history_database is None or not self.key_columns:
            return None
        return f"{ident(self.history_database)}.{ident(self.name)}"

    @property
    def keeps_deleted_rows(self) -> bool:
        """Its deletion markers carry the row's last values (a keyed soft or history table)."""
        return bool(self.key_columns) and keeps_deleted_rows(self.delete_policy)

    @property
    def append_only(self) -> bool:
        return not self.key_columns


def _named_records(
    schema: Any, namespace: str = "", found: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every record defined inside `schema`, by short and full name (Avro reuses a record by
    name: Debezium defines `Value` in `before` and refers to it by name in `after`)."""
    found = {} if found is None else found
    if isinstance(schema, list):
        for branch in schema:
            _named_records(branch, namespace, found)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            space = schema.get("namespace", namespace)
            found[schema["name"]] = schema
            found[f"{space}.{schema['name']}" if space else schema["name"]] = schema
            for f in schema["fields"]:
                _named_records(f["type"], space, found)
        elif isinstance(schema.get("type"), dict | list):
            _named_records(schema["type"], namespace, found)
    return found


def value_columns(value_schema: dict[str, Any]) -> list[SourceColumn]:
    """The source table's columns from a Debezium envelope schema (the `after` record)."""
    records = _named_records(value_schema)
    after = [f for f in value_schema.get("fields", ()) if f.get("name") == "after"]
    branches = (after[0]["type"] if after else None) or []
    branches = branches if isinstance(branches, list) else [branches]
    found = [records.get(b) if isinstance(b, str) else b for b in branches if b != "null"]
    record = found[0] if found else None
    if not isinstance(record, dict) or record.get("type") != "record":
        raise PoisonMessage(
            "schema", "not a Debezium envelope: the value schema has no `after` record"
        )
    columns = []
    for f in record["fields"]:
        try:
            columns.append(SourceColumn(f["name"], column_type(f["type"]), f.get("default")))
        except UnsupportedType as exc:
            raise PoisonMessage("schema", f"column {f['name']}: {exc}") from exc
    return columns


def key_columns(key_schema: dict[str, Any] | None) -> list[str]:
    if key_schema is None:
        return []
    return [f["name"] for f in key_schema["fields"]]


class ViewKeeper(Protocol):  # projector/replicas/analyst_views.py
    def keep(self, source_schema: str, replica: ReplicaTable) -> None: ...


class ReplicaCatalog:
    """Knows which replica tables exist with which columns, and creates/extends them."""

    def __init__(
        self,
        ch: ClickHouse,
        database_prefix: str,
        reread: Callable[[str, str], None] = lambda table, reason: None,
        views: ViewKeeper | None = None,
        delete_policies: Mapping[str, DeletePolicy] | None = None,
        history_prefix: str | None = None,
    ) -> None:
        """`reread(table, reason)` asks for the source table (`schema.table`) to be read again
        from Postgres (projector/replicas/signal_table.py); `views`: the analysts' view of each
        replica, kept with its shape (the live replicas' catalog only, not a rebuild's shadow);
        `delete_policies`: `schema.table` → policy (default hard); `history_prefix`: the
        databases of the `history` tables (None: none written, e.g. a rebuild's shadow, whose
        events the live history holds already)."""
        self.ch = ch
        self.prefix = database_prefix
        self.reread = reread
        self.views = views
        self.delete_policies = dict(delete_policies or {})
        self.history_prefix = history_prefix
        self.tables: dict[tuple[str, str], ReplicaTable] = {}

    def database_for(self, source_schema: str) -> str:
        return f"{self.prefix}{source_schema}"

    def _load(self, database: str, name: str) -> ReplicaTable | None:
        rows = self.ch.rows(
            "SELECT name, type, is_in_sorting_key FROM system.columns "
            f"WHERE database = {quote(database)} AND table = {quote(name)} ORDER BY position"
        )
        if not rows:
            return None
        engine = self.ch.rows(
            f"SELECT engine FROM system.tables WHERE database = {quote(database)} AND name = {quote(name)}"
        )[0]["engine"]
        keys = [r["name"] for r in rows if r["is_in_sorting_key"]] if "Replacing" in engine else []
        return ReplicaTable(database, name, keys, {r["name"]: r["type"] for r in rows})

    def existing(self, source_schema: str, table: str) -> ReplicaTable | None:
        """The replica table if it exists (cached), without creating anything."""
        cache_key = (source_schema, table)
        if cache_key not in self.tables:
            loaded = self._load(self.database_for(source_schema), table)
            if loaded is None:
                return None
            self._with_policy(source_schema, loaded)
            self.tables[cache_key] = loaded
        return self.tables[cache_key]

    def policy_of(self, source_schema: str, table: str) -> DeletePolicy:
        return self.delete_policies.get(f"{source_schema}.{table}", "hard")

    def _with_policy(self, source_schema: str, replica: ReplicaTable) -> None:
        """The table's delete policy, and its history table made if the policy wants one (with
        the replica's columns as they are: from then on every ALTER is done to both)."""
        replica.delete_policy = self.policy_of(source_schema, replica.name)
        if self.history_prefix is not None:
            replica.history_database = f"{self.history_prefix}{source_schema}"
        if replica.history is not None and replica.history_database is not None:
            create_history_table(
                self.ch,
                replica.database,
                replica.name,
                replica.history_database,
                replica.key_columns,
            )

    def ensure(
        self,
        source_schema: str,
        table: str,
        keys: list[str],
        columns: list[SourceColumn],
        upcaster: Upcaster = NO_UPCASTER,
        previous: Callable[[], list[SourceColumn] | None] = lambda: None,
    ) -> ReplicaTable:
        """The replica table for these columns (one writer schema's): created if missing, then
        brought to the schema step by step (docs/projector.md, "Schema versions and upcasters"):

        1. declared renames carried out;
        2. the plan, from the replica and the table's previous schema version (`previous`, the
           columns of the version registered before this one; asked for only when the replica
           and this schema differ): columns to add, columns this version dropped, nullability
           widened, declared type conversions, and columns this version retyped;
        3. a re-read of the table requested from Postgres (`reread`), *before* any ALTER: once
           the replica has the new shape, a replay of this batch no longer sees a change, so a
           request that came after the ALTERs could be lost to a crash between them;
        4. the ALTERs.
        """
        qualified_name = f"{source_schema}.{table}"
        replica = self.existing(source_schema, table)
        if replica is None:
            replica = self._create(self.database_for(source_schema), table, keys, columns)
            self._with_policy(source_schema, replica)
            self.tables[(source_schema, table)] = replica
        # 1.
        for old, new in upcaster.renames.items():
            if old in replica.columns and new not in replica.columns:
                self._rename(replica, old, new)
        # 2.
        step = SchemaStep.plan(qualified_name, replica, columns, upcaster, previous)
        # 3.
        if step.reread_reason and not replica.append_only:  # Debezium re-reads by the key
            self.reread(qualified_name, step.reread_reason)
        # 4.
        for column in step.added:
            for definition in column.definitions():
                self._alter(replica, f"ADD COLUMN IF NOT EXISTS {definition}")
            replica.columns[column.name] = column.ctype.clickhouse
        for column in step.retyped:
            self._replace(replica, column)
        for name in step.dropped:
            self._make_nullable(replica, name, remove_default=True)
        for name in step.widened:
            self._make_nullable(replica, name, remove_default=False)
        for column in step.converted:
            self._alter(replica, f"MODIFY COLUMN {ident(column.name)} {column.ctype.clickhouse}")
            replica.columns[column.name] = column.ctype.clickhouse
        if self.views is not None:
            self.views.keep(source_schema, replica)
        return replica

    def _alter(self, replica: ReplicaTable, action: str) -> None:
        """An ALTER of the replica, and first of its history table (the same columns, always):
        the replica's shape is what marks a schema step done, so a replay after a crash in
        between does both again (every action here can be done twice)."""
        if replica.history is not None:
            self.ch.execute(self.ch.topology.alter_table(replica.history, action))
        self.ch.execute(self.ch.topology.alter_table(replica.qualified, action))

    def _replace(self, replica: ReplicaTable, column: SourceColumn) -> None:
        """Drop the column's stored values and add it again with its new type, nullable and
        without a default: a row shows NULL there until the re-read (or a change) writes it.
        One ALTER, so no moment exists at which the column is missing."""
        fresh = SourceColumn(
            column.name, replace(column.ctype, clickhouse=nullable(column.ctype.clickhouse))
        )
        drops = [
            f"DROP COLUMN IF EXISTS {ident(name)}"
            for name in (column.name, column.name + INPUT_SUFFIX)
            if name in replica.columns
        ]
        adds = [f"ADD COLUMN {definition}" for definition in fresh.definitions()]
        self._alter(replica, ", ".join(drops + adds))
        replica.columns.pop(column.name + INPUT_SUFFIX, None)
        replica.columns[column.name] = fresh.ctype.clickhouse
        if fresh.ctype.clickhouse_input_expr:
            replica.columns[fresh.input_name] = fresh.ctype.clickhouse

    def _make_nullable(self, replica: ReplicaTable, name: str, remove_default: bool) -> None:
        """The column holds NULL from now on where a row carries none. `remove_default` (the
        source dropped it): rows written later get NULL, not the default it was added with;
        stored rows keep theirs, materialized first (ClickHouse computes a default of a part
        written before the column existed when it reads it, so removing the default would
        otherwise change them)."""
        definition = self.ch.rows(
            "SELECT name, type, default_kind, default_expression FROM system.columns "
            f"WHERE database = {quote(replica.database)} AND table = {quote(replica.name)} "
            f"AND name IN ({quote(name)}, {quote(name + INPUT_SUFFIX)})"
        )
        by_name = {r["name"]: r for r in definition}
        if name not in by_name:
            return
        column = by_name[name]
        input_column = by_name.get(name + INPUT_SUFFIX)
        sync = " SETTINGS mutations_sync = 2"
        if input_column is not None:  # bytea & co: the input goes NULL, and so does the column
            self._alter(
                replica,
                f"MODIFY COLUMN {ident(input_column['name'])} {nullable(input_column['type'])} "
                f"EPHEMERAL, MODIFY COLUMN {ident(name)} {nullable(column['type'])} "
                f"DEFAULT {column['default_expression']}{sync}",
            )
            replica.columns[input_column["name"]] = nullable(input_column["type"])
        else:
            # Nullable last: it is what marks the step done, so a replay after a crash in
            # between does the rest (the default is gone only once materialized).
            if remove_default and column["default_kind"] == "DEFAULT":
                self._alter(replica, f"MATERIALIZE COLUMN {ident(name)}{sync}")
                self._alter(replica, f"MODIFY COLUMN {ident(name)} REMOVE DEFAULT{sync}")
            self._alter(replica, f"MODIFY COLUMN {ident(name)} {nullable(column['type'])}{sync}")
        replica.columns[name] = nullable(column["type"])

    def _rename(self, replica: ReplicaTable, old: str, new: str) -> None:
        if old in replica.key_columns:
            raise PoisonMessage(
                "schema", f"key column {replica.name}.{old} was renamed: rebuild the replica"
            )
        for suffix in ("", INPUT_SUFFIX) if old + INPUT_SUFFIX in replica.columns else ("",):
            self._alter(
                replica, f"RENAME COLUMN IF EXISTS {ident(old + suffix)} TO {ident(new + suffix)}"
            )
            replica.columns[new + suffix] = replica.columns.pop(old + suffix)

    def _create(
        self, database: str, table: str, keys: list[str], columns: list[SourceColumn]
    ) -> ReplicaTable:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(database))
        defs = [d for c in columns for d in c.definitions()]
        defs += [f"{ident(n)} {t}" for n, t in META_COLUMNS.items()]
        # The rows one batch wrote are found by (_partition, _offset) range (read models do,
        # projector/read_models/maintenance.py): offsets only grow, so every older granule is skipped.
        defs.append("INDEX _batch_rows (_partition, _offset) TYPE minmax GRANULARITY 1")
        if keys:
            family, args = "ReplacingMergeTree", "_version, _is_deleted"
            order = "(" + ", ".join(ident(k) for k in keys) + ")"
        else:
            family, args, order = "MergeTree", "", "(_partition, _offset)"
        self.ch.execute(
            topology.create_table(f"{ident(database)}.{ident(table)}", defs, family, args, order)
        )
        loaded = self._load(database, table)
        assert loaded is not None
        return loaded


UPCASTERS_FILE_HINT = "schemas/upcasters.toml"


def upcast(column: SourceColumn, upcaster: Upcaster) -> SourceColumn:
    """The column under the table's upcaster: its current name, its declared ClickHouse type."""
    name = upcaster.current_name(column.name)
    declared = upcaster.retypes.get(name)
    ctype = column.ctype if declared is None else replace(column.ctype, clickhouse=declared)
    return SourceColumn(name, ctype, column.default)


def nullable(clickhouse: str) -> str:
    """The type that can also hold NULL (ClickHouse has no Nullable array, map or tuple: those
    stay, and show empty instead)."""
    if clickhouse.startswith(("Nullable(", "LowCardinality(Nullable(", "Array(", "Map(", "Tuple(")):
        return clickhouse
    if clickhouse.startswith("LowCardinality("):
        return clickhouse.replace("(", "(Nullable(", 1) + ")"
    return f"Nullable({clickhouse})"


def base_type(clickhouse: str) -> str:
    """The type without its nullability: a column that became nullable (or NOT NULL) holds the
    same values, so it is not a type change."""
    if clickhouse.startswith("LowCardinality(Nullable("):
        return "LowCardinality(" + clickhouse[len("LowCardinality(Nullable(") : -2] + ")"
    if clickhouse.startswith("Nullable("):
        return clickhouse[len("Nullable(") : -1]
    return clickhouse


@dataclass
class SchemaStep:
    """What a writer schema changes in its replica table (`ReplicaCatalog.ensure`, step 2)."""

    added: list[SourceColumn] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # dropped by this version: NULL from now on
    widened: list[str] = field(default_factory=list)  # now nullable in the source
    converted: list[SourceColumn] = field(default_factory=list)  # declared `retypes`
    retyped: list[SourceColumn] = field(default_factory=list)  # replaced, then re-read
    reread_reason: str = ""

    @classmethod
    def plan(
        cls,
        table: str,
        replica: ReplicaTable,
        columns: list[SourceColumn],
        upcaster: Upcaster,
        previous_version: Callable[[], list[SourceColumn] | None],
    ) -> SchemaStep:
        step = cls()
        asked: list[list[SourceColumn] | None] = []

        def previous() -> list[SourceColumn] | None:
            if not asked:
                asked.append(previous_version())
            return asked[0]

        step.added = [c for c in columns if c.name not in replica.columns]
        if step.added and _undeclared_rename(table, columns, previous()):
            # The last column's name changed: a rename of it, or a drop of it plus an added
            # column, look the same (a new column is appended where the dropped one was). Either
            # way the replica gets the new column, and the stored rows their values from Postgres.
            step.reread_reason = "its last column was renamed, or dropped and another added"
        names = {c.name for c in columns}
        stored = set(replica.columns) - set(META_COLUMNS)
        if stored - names - {n for n in stored if n.endswith(INPUT_SUFFIX)}:
            step.dropped = [
                c.name
                for c in previous() or []
                if c.name not in names
                and c.name in replica.columns
                and c.name not in replica.key_columns
                and nullable(replica.columns[c.name]) != replica.columns[c.name]
            ]
        before = {c.name: c for c in previous() or []} if _types_differ(replica, columns) else {}
        for column in columns:
            now = replica.columns.get(column.name)
            if now is None or now == column.ctype.clickhouse:
                continue
            if base_type(now) == base_type(column.ctype.clickhouse):
                if (
                    nullable(now) != now
                    and nullable(column.ctype.clickhouse) == column.ctype.clickhouse
                ):
                    step.widened.append(column.name)
                continue
            if column.name in upcaster.retypes:
                step.converted.append(column)
                continue
            if column.name in replica.key_columns or replica.append_only:
                raise PoisonMessage(
                    "schema",
                    f"column {table}.{column.name} changed type from {now} to "
                    f"{column.ctype.clickhouse}: "
                    + (
                        "it is part of the key: rebuild the replica of the table"
                        if column.name in replica.key_columns
                        else f"declare the type it converts to under `retypes` in "
                        f"{UPCASTERS_FILE_HINT}, then run `projector dlq replay`"
                    ),
                )
            was = before.get(column.name)
            if was is not None and base_type(was.ctype.clickhouse) != base_type(
                column.ctype.clickhouse
            ):
                # This version made the change: Postgres rewrote the stored rows outside the
                # WAL, so they are read again rather than cast here.
                step.retyped.append(column)
                step.reread_reason = (
                    f"column {column.name} changed type from {now} to {column.ctype.clickhouse}"
                )
            # Otherwise an older version's event (a replay, a backlog): its value goes into the
            # column as it is now; the re-read after the change carries the current values.
        return step


def _types_differ(replica: ReplicaTable, columns: list[SourceColumn]) -> bool:
    return any(
        c.name in replica.columns
        and base_type(replica.columns[c.name]) != base_type(c.ctype.clickhouse)
        for c in columns
    )


def _undeclared_rename(
    table: str, columns: list[SourceColumn], previous: list[SourceColumn] | None
) -> bool:
    """Postgres keeps a renamed column's position, so a version whose field at position i has a
    new name while the previous version's field i is gone is a rename, not a drop plus an add
    (which would append the new field). Undeclared, it is refused rather than split in two —
    unless i is the last position: there a dropped column plus an added one look the same, and
    True says so (the caller has the table re-read)."""
    if previous is None:
        return False
    before_names = [c.name for c in previous]
    names = [c.name for c in columns]
    for position, (before, now) in enumerate(zip(before_names, names, strict=False)):
        if before != now and before not in names and now not in before_names:
            if position == len(before_names) - 1:
                return True
            raise PoisonMessage(
                "schema",
                f"column {table}.{before} (position {position + 1}) looks renamed to {now}: "
                f"declare it under `renames` in {UPCASTERS_FILE_HINT} "
                f'({{ {before} = "{now}" }}), then run `projector dlq replay`',
            )
    return False


def _default_clause(column: SourceColumn) -> str:
    """Postgres fills existing rows with a new column's constant default without writing WAL;
    the replica must show the same value for them, so the column gets that default."""
    if column.default is None:
        return ""
    try:
        value = column.ctype.to_clickhouse(column.default)
    except (UnconvertibleValue, TypeError, ValueError):
        return ""
    return f" DEFAULT CAST({quote(str(value).lower() if isinstance(value, bool) else str(value))} AS {column.ctype.clickhouse})"


def commit_ts(source: dict[str, Any]) -> str:
    return _millis_text(int(source.get("ts_ms") or 0))


@lru_cache(maxsize=4096)
def _millis_text(millis: int) -> str:
    """Many events share a commit millisecond: format each one once."""
    return datetime.fromtimestamp(millis / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
