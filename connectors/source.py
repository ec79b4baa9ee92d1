"""The Postgres side of capture: control tables, grants and the filtered publication.

`publication.autocreate.mode` is `disabled` in the connector: this module owns the publication so
that Debezium can run as a least-privilege role (LOGIN REPLICATION + SELECT) and so that tables
created after the connector started can be brought in without a restart. It runs with an admin DSN
(a role that owns the captured tables or is superuser).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import psycopg
from psycopg import sql

from connectors.config import CONTROL_SCHEMA, HEARTBEAT_TABLE, SIGNAL_TABLE, CaptureSpec


@dataclass(frozen=True)
class PublicationChange:
    created: bool
    added: tuple[str, ...]
    removed: tuple[str, ...]


def _ident(qualified: str) -> sql.Composable:
    schema, table = qualified.split(".", 1)
    return sql.Identifier(schema, table)


def ensure_control_tables(conn: psycopg.Connection, cdc_user: str) -> None:
    """Signal and heartbeat tables in their own schema, writable by the CDC role."""
    user = sql.Identifier(cdc_user)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CONTROL_SCHEMA)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id varchar(64) PRIMARY KEY, type varchar(32) NOT NULL,"
            " data varchar(2048))"
        ).format(_ident(SIGNAL_TABLE))
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY, beat_at timestamptz NOT NULL)"
        ).format(_ident(HEARTBEAT_TABLE))
    )
    conn.execute(
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(CONTROL_SCHEMA), user)
    )
    for table in (SIGNAL_TABLE, HEARTBEAT_TABLE):
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(_ident(table), user)
        )


def captured_tables(conn: psycopg.Connection, capture: CaptureSpec) -> list[str]:
    """Ordinary and partitioned tables that the capture spec covers, as `schema.table`."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        ORDER BY 1, 2
        """
    ).fetchall()
    return [f"{s}.{t}" for s, t in rows if capture.covers(s, t)]


def grant_select(
    conn: psycopg.Connection, capture: CaptureSpec, tables: list[str], cdc_user: str
) -> None:
    """The CDC role reads captured tables (snapshots) and future tables of captured schemas."""
    user = sql.Identifier(cdc_user)
    for schema in capture.schemas:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), user))
        conn.execute(
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(schema), user
            )
        )
    for table in tables:
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(table.split(".")[0]), user
            )
        )
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(_ident(table), user))


def sync_publication(
    conn: psycopg.Connection, publication: str, tables: list[str]
) -> PublicationChange:
    """Make the publication contain exactly `tables` plus the control tables."""
    wanted = set(tables) | {SIGNAL_TABLE, HEARTBEAT_TABLE}
    exists = conn.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", [publication]
    ).fetchone()
    if not exists:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(_ident(t) for t in sorted(wanted))
            )
        )
        return PublicationChange(True, tuple(sorted(tables)), ())
    current = {
        f"{s}.{t}"
        for s, t in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            [publication],
        )
    }
    added, removed = sorted(wanted - current), sorted(current - wanted)
    if added:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(_ident(t) for t in added)
            )
        )
    if removed:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(_ident(t) for t in removed)
            )
        )
    control = {SIGNAL_TABLE, HEARTBEAT_TABLE}
    return PublicationChange(
        False,
        tuple(t for t in added if t not in control),
        tuple(t for t in removed if t not in control),
    )


def request_incremental_snapshot(conn: psycopg.Connection, tables: list[str]) -> str:
    """Ask Debezium (through the signal table) to snapshot `tables` while streaming goes on."""
    signal_id = str(uuid.uuid4())
    payload = json.dumps({"data-collections": tables, "type": "incremental"})
    conn.execute(
        sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s)").format(
            _ident(SIGNAL_TABLE)
        ),
        [signal_id, payload],
    )
    return signal_id
