"""The Postgres side of capture: control tables, grants and the filtered publication.

`publication.autocreate.mode` is `disabled` in the connector: this module owns the publication so
that Debezium can run as a least-privilege role (LOGIN REPLICATION + SELECT) and so that tables
created after the connector started can be brought in without a restart. It runs with an admin DSN
(a role that owns the captured tables or is superuser).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import psycopg
from psycopg import sql

from connectors.config import CONTROL_SCHEMA, HEARTBEAT_TABLE, SIGNAL_TABLE, CaptureSpec
from connectors.errors import ConnectorError
from connectors.row_filters import current_filters


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


# Why Postgres cannot publish a relation's UPDATEs and DELETEs, by `pg_class.relreplident` (and
# whether the index that identity needs exists). A relation missing from this table is fine:
# DEFAULT with a primary key, FULL, or USING INDEX with its index.
IDENTITY_GAPS: dict[tuple[str, bool], str] = {
    ("d", False): "no primary key and REPLICA IDENTITY DEFAULT",
    ("n", False): "REPLICA IDENTITY NOTHING",
    ("n", True): "REPLICA IDENTITY NOTHING",
    ("i", False): "its REPLICA IDENTITY index no longer exists",
}


@dataclass(frozen=True)
class IdentityGap:
    """A captured table whose rows Postgres cannot identify in the WAL: once it is in the
    publication, every UPDATE and DELETE on it fails ("cannot update table ... because it does
    not have a replica identity and publishes updates"). For a partitioned table, `relations`
    are the partitions lacking an identity (the statements run on them)."""

    table: str  # schema.table
    relations: tuple[str, ...]  # schema.table of each relation lacking an identity
    reason: str

    def remedy(self) -> str:
        """The statements that make the table safe to capture."""
        return "; ".join(
            f"ALTER TABLE {display_name(r)} REPLICA IDENTITY FULL" for r in self.relations
        )


def display_name(qualified: str) -> str:
    """`schema.table` as one writes it in SQL (quoted only where Postgres needs quotes)."""
    return ".".join(
        part if re.fullmatch(r"[a-z_][a-z0-9_$]*", part) else '"' + part.replace('"', '""') + '"'
        for part in qualified.split(".", 1)
    )


def identity_gaps(conn: psycopg.Connection, tables: list[str]) -> list[IdentityGap]:
    """The tables among `tables` (`schema.table`) that Postgres could not publish UPDATEs and
    DELETEs of. A partitioned table is checked on its leaf partitions, where rows live (a
    partition does not inherit its parent's REPLICA IDENTITY)."""
    if not tables:
        return []
    schemas, names = zip(*(t.split(".", 1) for t in tables), strict=True)
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, ln.nspname, l.relname, l.relreplident,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = l.oid
                       AND (i.indisprimary AND l.relreplident = 'd'
                            OR i.indisreplident AND l.relreplident = 'i'))
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL (
            SELECT relid FROM pg_partition_tree(c.oid) WHERE isleaf
            UNION SELECT c.oid WHERE c.relkind = 'r'
        ) AS leaf (oid)
        JOIN pg_class l ON l.oid = leaf.oid
        JOIN pg_namespace ln ON ln.oid = l.relnamespace
        WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
        ORDER BY 1, 2, 3, 4
        """,
        [list(schemas), list(names)],
    ).fetchall()
    gaps: dict[str, tuple[list[str], set[str]]] = {}
    for schema, table, leaf_schema, leaf, identity, has_index in rows:
        reason = IDENTITY_GAPS.get((identity, bool(has_index)))
        if reason is not None:
            relations, reasons = gaps.setdefault(f"{schema}.{table}", ([], set()))
            relations.append(f"{leaf_schema}.{leaf}")
            reasons.add(reason)
    return [
        IdentityGap(table, tuple(relations), "; ".join(sorted(reasons)))
        for table, (relations, reasons) in sorted(gaps.items())
    ]


def without_primary_key(conn: psycopg.Connection, tables: list[str]) -> set[str]:
    """The tables among `tables` that have no primary key. Debezium's incremental snapshot
    chunks a table by its primary key and skips one without (it logs a warning), so such a
    table's existing rows arrive only from the initial snapshot."""
    if not tables:
        return set()
    schemas, names = zip(*(t.split(".", 1) for t in tables), strict=True)
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
          AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
        """,
        [list(schemas), list(names)],
    ).fetchall()
    return {f"{s}.{t}" for s, t in rows}


# How long `set_replica_identity_full` waits for the table lock. ALTER TABLE queues behind open
# transactions on the table and every later statement on it queues behind the ALTER: a short
# wait bounds what the application can notice.
IDENTITY_LOCK_TIMEOUT = "2s"


def set_replica_identity_full(conn: psycopg.Connection, gaps: list[IdentityGap]) -> None:
    """REPLICA IDENTITY FULL on every relation of `gaps` (the operator asked for it): the WAL
    then carries the whole old row of an UPDATE or DELETE, so Postgres can publish them."""
    for gap in gaps:
        for relation in gap.relations:
            try:
                with conn.transaction():
                    conn.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(IDENTITY_LOCK_TIMEOUT)
                    )
                    conn.execute(
                        sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(_ident(relation))
                    )
            except psycopg.errors.LockNotAvailable as exc:
                raise ConnectorError(
                    f"could not set REPLICA IDENTITY FULL on {display_name(relation)} within "
                    f"{IDENTITY_LOCK_TIMEOUT}: a transaction holds a lock on it. Nothing was "
                    "added to the publication; run apply again when it is quieter"
                ) from exc


def has_rows(conn: psycopg.Connection, table: str) -> bool:
    """Whether `table` (schema.table) holds a row: a snapshot of an empty table reads nothing."""
    return conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(_ident(table))
    ).fetchone() == (True,)


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


def _publication_delta(
    conn: psycopg.Connection, publication: str, tables: list[str]
) -> tuple[bool, list[str], list[str]]:
    """(exists, tables to add, tables to drop) to make the publication contain exactly `tables`
    plus the control tables. Reads only."""
    wanted = set(tables) | {SIGNAL_TABLE, HEARTBEAT_TABLE}
    exists = conn.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", [publication]
    ).fetchone()
    if not exists:
        return False, sorted(wanted), []
    current = {
        f"{s}.{t}"
        for s, t in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            [publication],
        )
    }
    return True, sorted(wanted - current), sorted(current - wanted)


def _captured_only(exists: bool, added: list[str], removed: list[str]) -> PublicationChange:
    control = {SIGNAL_TABLE, HEARTBEAT_TABLE}
    return PublicationChange(
        not exists,
        tuple(t for t in added if t not in control),
        tuple(t for t in removed if t not in control),
    )


def plan_publication(
    conn: psycopg.Connection, publication: str, tables: list[str]
) -> PublicationChange:
    """What `sync_publication` would change, without changing it."""
    return _captured_only(*_publication_delta(conn, publication, tables))


def sync_publication(
    conn: psycopg.Connection, publication: str, tables: list[str]
) -> PublicationChange:
    """Make the publication contain exactly `tables` plus the control tables. Every table must
    have a replica identity (`identity_gaps` finds those that do not): the application's UPDATEs
    and DELETEs on a published table without one fail."""
    exists, added, removed = _publication_delta(conn, publication, tables)
    name = sql.Identifier(publication)
    if not exists:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                name, sql.SQL(", ").join(_ident(t) for t in added)
            )
        )
        return _captured_only(exists, added, removed)
    if added:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                name, sql.SQL(", ").join(_ident(t) for t in added)
            )
        )
    if removed:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                name, sql.SQL(", ").join(_ident(t) for t in removed)
            )
        )
    return _captured_only(exists, added, removed)


def request_incremental_snapshot(
    conn: psycopg.Connection,
    tables: list[str],
    signal_id: str | None = None,
    where: str | None = None,
    publication: str | None = None,
) -> str:
    """Ask Debezium (through the signal table) to snapshot `tables` while streaming goes on;
    with `where`, only their rows matching that Postgres condition (Debezium's
    `additional-conditions`, added to each chunk's SELECT).

    With a `signal_id` of the caller's, asking again is a no-op: the row exists, `ON CONFLICT DO
    NOTHING` writes nothing to the WAL, and Debezium (which reads signals from the WAL) sees
    one request. Debezium's notifications about the snapshot carry the signal's id."""
    signal_id = signal_id or str(uuid.uuid4())
    request: dict[str, object] = {"data-collections": tables, "type": "incremental"}
    # a table's row filter in the `publication` (connectors/row_filters.py) holds for every
    # snapshot of it, read here so that no caller can forget it
    filters = current_filters(conn, publication) if publication else {}
    conditions = []
    for table in tables:
        both = [f"({c})" for c in (where, filters.get(table)) if c]
        if both:
            conditions.append({"data-collection": table, "filter": " AND ".join(both)})
    if conditions:
        request["additional-conditions"] = conditions
    payload = json.dumps(request)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s) "
            "ON CONFLICT (id) DO NOTHING"
        ).format(_ident(SIGNAL_TABLE)),
        [signal_id, payload],
    )
    return signal_id


# Tables created later in a captured schema join the publication by themselves: an event trigger
# adds each new table that Postgres can publish UPDATEs and DELETEs of (the rule of
# `identity_gaps`), in the transaction that creates it, so its first row is already published and
# no snapshot is needed (a table is empty when CREATE TABLE ends; CREATE TABLE AS makes no key).
# A key-less table is not added — the application's UPDATEs and DELETEs on it would fail — and
# the server log names it; `apply` warns about it and, once it has a key, adds it and snapshots
# its rows. Nothing in the trigger may fail the application's DDL: every error is a WARNING.
CAPTURE_TRIGGER = "projector_capture_new_tables"
CAPTURE_FUNCTION = f"{CONTROL_SCHEMA}.capture_new_tables"
CAPTURE_FUNCTION_BODY = """
DECLARE
  created record;
BEGIN
  FOR created IN
    SELECT DISTINCT c.oid, n.nspname, c.relname
    FROM pg_event_trigger_ddl_commands() AS d
    JOIN pg_class c ON c.oid = d.objid AND d.classid = 'pg_class'::regclass
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND n.nspname = ANY ({schemas}::text[])
      AND format('%s.%s', n.nspname, c.relname) <> ALL ({left_out}::text[])
  LOOP
    BEGIN
      IF EXISTS (  -- a relation holding rows that Postgres could not identify in the WAL
        SELECT 1 FROM (SELECT relid FROM pg_partition_tree(created.oid) WHERE isleaf
                       UNION SELECT created.oid) AS leaf (oid)
        JOIN pg_class l ON l.oid = leaf.oid AND l.relkind = 'r'
        WHERE NOT (l.relreplident = 'f'
                   OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = l.oid
                              AND (i.indisprimary AND l.relreplident = 'd'
                                   OR i.indisreplident AND l.relreplident = 'i')))
      ) THEN
        RAISE LOG 'projector: %.% is not captured: no primary key and no replica identity '
                  '(add a key, or ALTER TABLE ... REPLICA IDENTITY FULL; then projector '
                  'connectors apply)', created.nspname, created.relname;
        CONTINUE;
      END IF;
      EXECUTE format('GRANT SELECT ON %I.%I TO %I', created.nspname, created.relname,
                     {cdc_user});
      EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', {publication},
                     created.nspname, created.relname);
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'projector: %.% could not join publication %: % (run projector '
                    'connectors apply)', created.nspname, created.relname, {publication},
                    SQLERRM;
    END;
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'projector: capturing new tables failed: % (run projector connectors apply)',
                SQLERRM;
END
"""


def install_capture_trigger(
    conn: psycopg.Connection,
    publication: str,
    capture: CaptureSpec,
    left_out: list[str],
    cdc_user: str,
) -> bool:
    """The event trigger that adds tables created later in the captured schemas to the
    publication (CAPTURE_FUNCTION_BODY); replaced on every apply, so it follows CAPTURE. False
    when the admin role may not create event triggers (only a superuser may): then a table
    created later is captured by the next `apply`."""
    body = sql.SQL(CAPTURE_FUNCTION_BODY).format(
        schemas=sql.Literal(list(capture.schemas)),
        left_out=sql.Literal(sorted(left_out)),
        publication=sql.Literal(publication),
        cdc_user=sql.Literal(cdc_user),
    )
    trigger = sql.Identifier(CAPTURE_TRIGGER)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(trigger))
            if not capture.schemas:
                return True
            conn.execute(
                sql.SQL(
                    "CREATE OR REPLACE FUNCTION {}() RETURNS event_trigger LANGUAGE plpgsql "
                    "SECURITY DEFINER SET search_path = pg_catalog AS {}"
                ).format(_ident(CAPTURE_FUNCTION), sql.Literal(body.as_string(conn)))
            )
            conn.execute(
                sql.SQL(
                    "CREATE EVENT TRIGGER {} ON ddl_command_end "
                    "WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') "
                    "EXECUTE FUNCTION {}()"
                ).format(trigger, _ident(CAPTURE_FUNCTION))
            )
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True
