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
  step 1; projector/topic_guard.py detects each and stops the table until it is rebuilt.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.errors import PoisonMessage
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

    @property
    def qualified(self) -> str:
        return f"{ident(self.database)}.{ident(self.name)}"

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


class ReplicaCatalog:
    """Knows which replica tables exist with which columns, and creates/extends them."""

    def __init__(self, ch: ClickHouse, database_prefix: str) -> None:
        self.ch = ch
        self.prefix = database_prefix
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
            self.tables[cache_key] = loaded
        return self.tables[cache_key]

    def ensure(
        self,
        source_schema: str,
        table: str,
        keys: list[str],
        columns: list[SourceColumn],
        upcaster: Upcaster = NO_UPCASTER,
        previous: Callable[[], list[str] | None] = lambda: None,
    ) -> ReplicaTable:
        """The replica table for these columns: created if missing, new columns added, declared
        renames and type changes carried out. `previous` gives the column names of the table's
        previous schema version, asked for only when a column is new (rename detection)."""
        replica = self.existing(source_schema, table)
        if replica is None:
            replica = self._create(self.database_for(source_schema), table, keys, columns)
            self.tables[(source_schema, table)] = replica
        for old, new in upcaster.renames.items():
            if old in replica.columns and new not in replica.columns:
                self._rename(replica, old, new)
        missing = [c for c in columns if c.name not in replica.columns]
        if missing:
            _refuse_undeclared_rename(f"{source_schema}.{table}", columns, previous())
        for column in missing:
            for definition in column.definitions():
                self.ch.execute(
                    self.ch.topology.alter_table(
                        replica.qualified, f"ADD COLUMN IF NOT EXISTS {definition}"
                    )
                )
            replica.columns[column.name] = column.ctype.clickhouse
        for column in columns:
            existing = replica.columns[column.name]
            if existing == column.ctype.clickhouse:
                continue
            if column.name not in upcaster.retypes:
                raise PoisonMessage(
                    "schema",
                    f"column {source_schema}.{table}.{column.name} changed type from {existing} "
                    f"to {column.ctype.clickhouse}: declare the type it converts to under "
                    f"`retypes` in {UPCASTERS_FILE_HINT}, then run `projector dlq replay`",
                )
            self.ch.execute(
                self.ch.topology.alter_table(
                    replica.qualified,
                    f"MODIFY COLUMN {ident(column.name)} {column.ctype.clickhouse}",
                )
            )
            replica.columns[column.name] = column.ctype.clickhouse
        return replica

    def _rename(self, replica: ReplicaTable, old: str, new: str) -> None:
        if old in replica.key_columns:
            raise PoisonMessage(
                "schema", f"key column {replica.name}.{old} was renamed: rebuild the replica"
            )
        for suffix in ("", INPUT_SUFFIX) if old + INPUT_SUFFIX in replica.columns else ("",):
            self.ch.execute(
                self.ch.topology.alter_table(
                    replica.qualified,
                    f"RENAME COLUMN {ident(old + suffix)} TO {ident(new + suffix)}",
                )
            )
            replica.columns[new + suffix] = replica.columns.pop(old + suffix)

    def _create(
        self, database: str, table: str, keys: list[str], columns: list[SourceColumn]
    ) -> ReplicaTable:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(database))
        defs = [d for c in columns for d in c.definitions()]
        defs += [f"{ident(n)} {t}" for n, t in META_COLUMNS.items()]
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


def _refuse_undeclared_rename(
    table: str, columns: list[SourceColumn], previous: list[str] | None
) -> None:
    """Postgres keeps a renamed column's position, so a version whose field at position i has a
    new name while the previous version's field i is gone is a rename, not a drop plus an add
    (which would append the new field). Undeclared, it is refused rather than split in two."""
    if previous is None:
        return
    names = [c.name for c in columns]
    for position, (before, now) in enumerate(zip(previous, names, strict=False)):
        if before != now and before not in names and now not in previous:
            raise PoisonMessage(
                "schema",
                f"column {table}.{before} (position {position + 1}) looks renamed to {now}: "
                f"declare it under `renames` in {UPCASTERS_FILE_HINT} "
                f'({{ {before} = "{now}" }}), then run `projector dlq replay`',
            )


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


def is_toast_placeholder(value: Any) -> bool:
    if value in (TOAST_PLACEHOLDER, TOAST_PLACEHOLDER_BYTES):
        return True
    return isinstance(value, list) and any(is_toast_placeholder(v) for v in value)


def commit_ts(source: dict[str, Any]) -> str:
    return _millis_text(int(source.get("ts_ms") or 0))


@lru_cache(maxsize=4096)
def _millis_text(millis: int) -> str:
    """Many events share a commit millisecond: format each one once."""
    return datetime.fromtimestamp(millis / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def encode_key(key: dict[str, Any] | None) -> str:
    return base64.b64encode(repr(sorted((key or {}).items())).encode()).decode()


def insert_rows(
    ch: ClickHouse, replica: ReplicaTable, rows: Iterable[dict[str, Any]], token: str
) -> int:
    batch = list(rows)
    if not batch:
        return 0
    columns = sorted({c for row in batch for c in row})
    ch.execute(insert_statement(replica.qualified, columns, batch, token))
    return len(batch)
