"""Replicas of captured tables that have never changed: created from their definition in Postgres.

Debezium creates a table's topic, and registers its schema, on the table's first change event; a
table that stays empty has neither. A read model needs every one of its source replicas, so
without this a shop whose `order_items` are still empty would have no `order_summary` at all. The
projector therefore creates, empty, the replica of every captured table that has none yet, from
the table's definition in Postgres: the columns and types Debezium's first schema will bring,
mapped here the way Debezium maps them with this connector's settings
(connectors/postgres-source.json: `decimal.handling.mode=precise`,
`time.precision.mode=adaptive_time_microseconds`, `interval.handling.mode=string`,
`binary.handling.mode=bytes`), then through `schemas.type_map` like every event.

Why an empty replica is exact: it is created only for a table that is empty in Postgres **and**
has no topic in Kafka (no change was ever captured). Every row the table gets later comes with a
change event after that moment, applied and counted like any other; a table that has rows, or
had changes, waits for them as before.

Correctness does not rest on the mapping: when the first event comes, its schema meets the
replica as any later schema version would (`ReplicaCatalog.ensure`): equal, nothing changes; a
type this mapping got wrong takes the usual schema step. A column whose type is not mapped here
(arrays, domains, ranges, extension types), a table without a primary key (Debezium's message key)
or with generated columns is left to wait for its first event.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from projector.errors import SourceUnavailable
from projector.replicas.catalog import ReplicaCatalog, SourceColumn, upcast
from schemas.type_map import column_type
from schemas.upcasters import Upcasters

log = logging.getLogger("projector")

DECIMAL = "org.apache.kafka.connect.data.Decimal"
# Postgres type → the Avro field type Debezium writes for it (see the module docstring).
SCALARS: dict[str, Any] = {
    "bool": "boolean",
    "int2": {"type": "int", "connect.type": "int16"},
    "int4": "int",
    "int8": "long",
    "float4": "float",
    "float8": "double",
    "text": "string",
    "varchar": "string",
    "bpchar": "string",
    "name": "string",
    "inet": "string",
    "cidr": "string",
    "macaddr": "string",
    "bytea": "bytes",
    "uuid": {"type": "string", "connect.name": "io.debezium.data.Uuid"},
    "json": {"type": "string", "connect.name": "io.debezium.data.Json"},
    "jsonb": {"type": "string", "connect.name": "io.debezium.data.Json"},
    "xml": {"type": "string", "connect.name": "io.debezium.data.Xml"},
    "date": {"type": "int", "connect.name": "io.debezium.time.Date"},
    "timestamptz": {"type": "string", "connect.name": "io.debezium.time.ZonedTimestamp"},
    "time": {"type": "long", "connect.name": "io.debezium.time.MicroTime"},
    "timetz": {"type": "string", "connect.name": "io.debezium.time.ZonedTime"},
    "interval": {"type": "string", "connect.name": "io.debezium.time.Interval"},
    "money": {"type": "bytes", "connect.name": DECIMAL, "connect.parameters": {"scale": "2"}},
}
VARIABLE_SCALE = {
    "type": "record",
    "name": "VariableScaleDecimal",
    "namespace": "io.debezium.data",
    "connect.name": "io.debezium.data.VariableScaleDecimal",
    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
}


@dataclass(frozen=True)
class PostgresColumn:
    name: str
    type_name: str  # pg_type.typname
    type_kind: str  # pg_type.typtype: b(ase), e(num), d(omain), ...
    typmod: int  # pg_attribute.atttypmod: -1 when the type has none
    not_null: bool


def debezium_type(column: PostgresColumn) -> Any | None:
    """The Avro field type Debezium writes for `column` (None: not one this module knows)."""
    if column.type_kind == "e":
        inner: Any = {"type": "string", "connect.name": "io.debezium.data.Enum"}
    elif column.type_name == "numeric":
        if column.typmod < 0:
            inner = VARIABLE_SCALE
        else:
            precision, scale = ((column.typmod - 4) >> 16) & 0xFFFF, (column.typmod - 4) & 0xFFFF
            inner = {
                "type": "bytes",
                "connect.name": DECIMAL,
                "connect.parameters": {
                    "scale": str(scale),
                    "connect.decimal.precision": str(precision),
                },
            }
    elif column.type_name == "timestamp":
        # adaptive_time_microseconds: milliseconds up to precision 3, else microseconds (the
        # default precision is 6)
        precision = 6 if column.typmod < 0 else column.typmod
        unit = "Timestamp" if precision <= 3 else "MicroTimestamp"
        inner = {"type": "long", "connect.name": f"io.debezium.time.{unit}"}
    elif column.type_kind == "b" and column.type_name in SCALARS:
        inner = SCALARS[column.type_name]
    else:
        return None
    return inner if column.not_null else ["null", inner]


@dataclass
class SourceTable:
    schema: str
    name: str
    keys: list[str] = field(default_factory=list)  # the primary key, in its order
    columns: list[PostgresColumn] = field(default_factory=list)
    generated: bool = False  # has a generated column (pgoutput does not send those)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def replica_columns(self) -> list[SourceColumn] | None:
        """The replica's columns as Debezium's first schema will bring them; None when a column's
        type is not one this module maps."""
        found = []
        for column in self.columns:
            avro = debezium_type(column)
            if avro is None:
                return None
            found.append(SourceColumn(column.name, column_type(avro), None))
        return found


CATALOG = """
SELECT n.nspname AS schema, c.relname AS name, a.attname AS column, t.typname AS type_name,
       t.typtype AS type_kind, a.atttypmod AS typmod, a.attnotnull AS not_null,
       a.attgenerated <> '' AS generated,
       array_position(i.indkey::int2[], a.attnum) AS key_position
FROM pg_publication_tables p
JOIN pg_namespace n ON n.nspname = p.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE p.pubname = %s AND n.nspname = ANY(%s)
ORDER BY n.nspname, c.relname, a.attnum
"""


def captured_tables(
    conn: Any, publication: str, schemas: list[str], table_pattern: str
) -> list[SourceTable]:
    """The tables of `publication` in `schemas` whose names match `table_pattern`, with their
    columns (in table order) and primary key."""
    pattern = re.compile(rf"^(?:{table_pattern})$")
    tables: dict[tuple[str, str], SourceTable] = {}
    keys: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for row in conn.execute(CATALOG, [publication, schemas]).fetchall():
        schema, name, column, type_name, kind, typmod, not_null, generated, position = row
        if not pattern.match(name):
            continue
        table = tables.setdefault((schema, name), SourceTable(schema, name))
        table.columns.append(PostgresColumn(column, type_name, kind, int(typmod), bool(not_null)))
        table.generated = table.generated or bool(generated)
        if position is not None:
            keys.setdefault((schema, name), []).append((int(position), column))
    for place, table in tables.items():
        table.keys = [column for _, column in sorted(keys.get(place, []))]
    return list(tables.values())


class SourceReplicas:
    """Creates the replica of every captured table that never changed (the module docstring)."""

    def __init__(
        self,
        dsn: str | None,
        publication: str,
        schemas: list[str],
        table_pattern: str,
        catalog: ReplicaCatalog,
        upcasters: Upcasters,
        table_topic: Callable[[str], str],
        topics: Callable[[], Collection[str] | None],
    ) -> None:
        """`table_topic`: SCHEMA.TABLE → its topic; `topics`: every topic Kafka has now (None:
        Kafka cannot say)."""
        self.dsn, self.publication = dsn, publication
        self.schemas, self.table_pattern = schemas, table_pattern
        self.catalog, self.upcasters = catalog, upcasters
        self.table_topic, self.topics = table_topic, topics

    def create_missing(self) -> list[str]:
        """Create them; a line per replica created."""
        if not self.dsn:
            return []  # nothing to read definitions from: replicas come with their first events
        import psycopg

        created = []
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                waiting = [
                    t
                    for t in captured_tables(
                        conn, self.publication, self.schemas, self.table_pattern
                    )
                    if self.catalog.existing(t.schema, t.name) is None
                ]
                if not waiting:
                    return []
                topics = self.topics()
                if topics is None:
                    return []  # asked again later
                for table in waiting:
                    columns = self._columns_if_never_changed(conn, table, topics)
                    if columns is None:
                        continue
                    upcaster = self.upcasters.for_table(table.schema, table.name)
                    columns = [upcast(c, upcaster) for c in columns]
                    self.catalog.ensure(table.schema, table.name, table.keys, columns, upcaster)
                    created.append(
                        f"{table.qualified}: replica created from its definition in Postgres "
                        "(empty, and no change captured yet)"
                    )
        except psycopg.OperationalError as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SourceUnavailable(
                f"cannot read captured tables from Postgres: {first_line}"
            ) from exc
        return created

    def _columns_if_never_changed(
        self, conn: Any, table: SourceTable, topics: Collection[str]
    ) -> list[SourceColumn] | None:
        if not table.keys or table.generated:
            return None
        if self.table_topic(table.qualified) in topics:
            return None  # it changed: its replica comes with those events
        columns = table.replica_columns()
        if columns is None:
            return None
        from psycopg import sql

        statement = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
            sql.Identifier(table.schema, table.name)
        )
        (has_rows,) = conn.execute(statement).fetchone()
        return None if has_rows else columns
