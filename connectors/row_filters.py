"""Row filters: only the rows of a table that match a condition leave Postgres.

One setting, `ROW_FILTERS`: `schema.table=<Postgres condition>` entries separated by `;`
(`ROW_FILTERS="shop.orders=region = 'eu'; public.events=kind <> 'debug'"`).

Where each path of a row out of Postgres applies it:
- streaming: the publication's row filter (Postgres 15+, `ADD TABLE t WHERE (…)`). Postgres
  then publishes an UPDATE that moves a row out of the filter as a DELETE, and one that moves a
  row in as an INSERT, so the replica holds exactly the matching rows;
- Debezium's snapshots: the initial (and any blocking) snapshot reads through
  `snapshot.select.statement.overrides`; every incremental snapshot (a table joining the
  capture, a re-read, a snapshot rebuild, a partial re-read) carries the filter as its
  `additional-conditions`, read from the publication itself when it is requested
  (`filters_in_publication`), so no path can forget it;
- `projector verify` and the snapshot rebuild's comparisons read the same rows from Postgres.

Postgres refuses the application's UPDATE and DELETE on a table whose publication filters on a
column outside its replica identity, and the application must never notice us: `plan_row_filters`
tries each filter first, in a transaction it rolls back (a publication of its own with the
filter, then an UPDATE and a DELETE that match no row: Postgres checks the identity before it
looks for rows), and refuses a filter Postgres would not take, or would take at the cost of the
application's statements (remedy: filter on key columns, or REPLICA IDENTITY FULL). The same try
yields Postgres's own spelling of the filter, which is what `pg_publication_tables` shows, so
running apply again changes nothing.

Changing a filter re-reads the table with the new one. Rows a narrower filter no longer matches
are not deleted by a re-read: `projector rebuild SCHEMA.TABLE --from snapshot` compares with
Postgres and removes them (apply says so).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from connectors.errors import ConnectorConfigError

FILTER_SETTING = "ROW_FILTERS"
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*")


def parse_row_filters(text: str | None) -> dict[str, str]:
    """`schema.table=condition` entries separated by `;` → {schema.table: condition}."""
    filters: dict[str, str] = {}
    for entry in (e.strip() for e in (text or "").split(";")):
        if not entry:
            continue
        table, sep, condition = entry.partition("=")
        table, condition = table.strip(), condition.strip()
        if not sep or not _TABLE.fullmatch(table) or not condition:
            raise ConnectorConfigError(
                f"{FILTER_SETTING} entry {entry!r} is not schema.table=<condition>"
            )
        if table in filters:
            raise ConnectorConfigError(f"{FILTER_SETTING} names {table} twice")
        filters[table] = condition
    return filters


@dataclass(frozen=True)
class RowFilters:
    """The filters of the captured tables, in Postgres's spelling."""

    filters: dict[str, str]  # table: the condition as Postgres deparses it
    changing: tuple[str, ...] = ()  # tables whose filter in the publication differs now
    not_captured: tuple[str, ...] = ()  # named in the setting, not captured


def plan_row_filters(
    admin_dsn: str, publication: str, wanted: Mapping[str, str], tables: list[str]
) -> RowFilters:
    """Try each filter (module docstring) and compare it with the publication's. Changes
    nothing: every try is rolled back. Raises ConnectorConfigError with the reason and remedy."""
    filters: dict[str, str] = {}
    changing = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:  # each try is rolled back
        for table in sorted(t for t in wanted if t in tables):
            filters[table] = _try(conn, table, wanted[table])
            if current_filter(conn, publication, table) != filters[table]:
                changing.append(table)
        for table in sorted(current_filters(conn, publication)):
            if table in tables and table not in wanted:
                changing.append(table)  # its filter goes
    return RowFilters(filters, tuple(changing), tuple(sorted(set(wanted) - set(tables))))


def _try(conn: psycopg.Connection, table: str, condition: str) -> str:
    schema, name = table.split(".", 1)
    qualified = sql.Identifier(schema, name)
    probe = f"projector_probe_{uuid.uuid4().hex[:12]}"
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WHERE ({})").format(
                    sql.Identifier(probe), qualified, sql.SQL(condition)
                )
            )
            ((spelled,),) = conn.execute(
                "SELECT rowfilter FROM pg_publication_tables WHERE pubname = %s", [probe]
            ).fetchall()
            # Postgres checks the replica identity against the filter before it looks for rows
            ((column,),) = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum LIMIT 1",
                [qualified.as_string(conn)],
            ).fetchall()
            conn.execute(sql.SQL("DELETE FROM {} WHERE false").format(qualified))
            conn.execute(
                sql.SQL("UPDATE {} SET {} = {} WHERE false").format(
                    qualified, sql.Identifier(column), sql.Identifier(column)
                )
            )
    except psycopg.errors.InvalidColumnReference as exc:
        raise ConnectorConfigError(
            f"{FILTER_SETTING} of {table}: {_first_line(exc)}. Postgres would refuse the "
            "application's UPDATEs and DELETEs on it: filter on key columns only, or give the "
            "table REPLICA IDENTITY FULL"
        ) from exc
    except psycopg.Error as exc:
        raise ConnectorConfigError(
            f"{FILTER_SETTING} of {table}: Postgres refuses {condition!r}: {_first_line(exc)}"
        ) from exc
    return str(spelled)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def current_filter(conn: psycopg.Connection, publication: str, table: str) -> str | None:
    """The table's row filter in the publication, as Postgres spells it (None: none)."""
    return current_filters(conn, publication).get(table)


def current_filters(conn: psycopg.Connection, publication: str) -> dict[str, str]:
    return {
        f"{schema}.{name}": str(condition)
        for schema, name, condition in conn.execute(
            "SELECT schemaname, tablename, rowfilter FROM pg_publication_tables "
            "WHERE pubname = %s AND rowfilter IS NOT NULL",
            [publication],
        ).fetchall()
    }


def snapshot_overrides(filters: Mapping[str, str]) -> dict[str, str]:
    """Debezium's settings that make its initial and blocking snapshots read the matching rows
    only (none without filters)."""
    if not filters:
        return {}
    config = {"snapshot.select.statement.overrides": ",".join(sorted(filters))}
    for table, condition in filters.items():
        schema, name = table.split(".", 1)
        config[f"snapshot.select.statement.overrides.{table}"] = (
            f'SELECT * FROM "{schema}"."{name}" WHERE ({condition})'
        )
    return config
