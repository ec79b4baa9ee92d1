"""Columns that must not leave Postgres as they are: excluded, or masked with a salted hash.

Two settings, in the form of CAPTURE (comma-separated, each `schema.table.column`):

- `EXCLUDE_COLUMNS`: the column never leaves Postgres. Where Postgres can, the publication's
  *column list* leaves it out (Postgres 15+: the WAL stream the connector reads does not carry it);
  Debezium's `column.exclude.list` leaves it out of its snapshots too, and of everything it writes
  to Kafka, the registry and so to the replicas, read models, dead letters and logs. A column list
  cannot leave out a column of the table's replica identity (Postgres would refuse the
  application's UPDATEs and DELETEs), and a key column is in every message's key: excluding or
  masking a key column is refused; on a table with REPLICA IDENTITY FULL the connector's
  exclusion alone applies (the WAL must carry every column).
- `MASK_COLUMNS` (with the secret `MASK_SALT`): the column arrives as the hex SHA-256 of its value
  with the salt (Debezium's `column.mask.hash.v2`), the same value always the same hash, so
  analysts still join and count by it. Text columns only (char, varchar, text).

A column list has a cost Postgres puts on the application: it refuses `ALTER TABLE … DROP COLUMN`
of a listed column ("publication … depends on column …"), and a column added later is not in the
list. The application must never notice us, so `apply` installs two event triggers around every
`ALTER TABLE` (and after `CREATE TABLE`): before it, the lists are lifted (the tables published
whole); after it, each table's list is set again to its columns now, less the excluded ones — in
the application's own transaction, so no other transaction is ever decoded in between. Exclusion
is by name: a column renamed is a new name (name it too, or exclude by the new name).

`apply` re-reads a table whose rules changed (an incremental snapshot of that table alone), so
its replica's current rows carry the masked values or lose the excluded ones; versions written
before stay in Kafka's history (docs/operations.md, "Keeping PII out").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from connectors.errors import ConnectorConfigError

EXCLUDE_SETTING, MASK_SETTING, SALT_SETTING = "EXCLUDE_COLUMNS", "MASK_COLUMNS", "MASK_SALT"
MASK_KEY_PREFIX = "column.mask.hash.v2.SHA-256.with.salt."  # + the salt: Debezium's own form
TEXT_TYPES = ("text", "varchar", "bpchar", "citext")
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_$]*"


def _columns(text: str | None, setting: str) -> tuple[str, ...]:
    entries = [e.strip() for e in (text or "").split(",") if e.strip()]
    for entry in entries:
        if not re.fullmatch(rf"{IDENTIFIER}\.{IDENTIFIER}\.{IDENTIFIER}", entry):
            raise ConnectorConfigError(f"{setting} entry {entry!r} is not schema.table.column")
    return tuple(sorted(set(entries)))


@dataclass(frozen=True)
class ColumnRules:
    excluded: tuple[str, ...] = ()  # schema.table.column
    masked: tuple[str, ...] = ()
    salt: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ColumnRules:
        excluded = _columns(env.get(EXCLUDE_SETTING), EXCLUDE_SETTING)
        masked = _columns(env.get(MASK_SETTING), MASK_SETTING)
        both = sorted(set(excluded) & set(masked))
        if both:
            raise ConnectorConfigError(
                f"{', '.join(both)}: both excluded and masked; an excluded column has nothing "
                "to mask"
            )
        salt = env.get(SALT_SETTING, "")
        if masked and len(salt) < 16:
            raise ConnectorConfigError(
                f"{MASK_SETTING} needs {SALT_SETTING}, a secret of at least 16 characters (a "
                "short or missing salt lets anyone hash guesses and compare)"
            )
        if salt and not re.fullmatch(r"[A-Za-z0-9_-]+", salt):
            raise ConnectorConfigError(
                f"{SALT_SETTING} may hold letters, digits, '_' and '-' only (it becomes part "
                "of a connector setting's name)"
            )
        return cls(excluded, masked, salt)

    def connector_config(self) -> dict[str, str]:
        """Debezium's settings for these rules (none when there are none)."""
        config = {}
        if self.excluded:
            config["column.exclude.list"] = ",".join(map(re.escape, self.excluded))
        if self.masked:
            config[MASK_KEY_PREFIX + self.salt] = ",".join(map(re.escape, self.masked))
        return config

    def excluded_in(self, table: str) -> tuple[str, ...]:
        """The excluded columns of `table` (schema.table), by name."""
        return tuple(c.rsplit(".", 1)[1] for c in self.excluded if c.rsplit(".", 1)[0] == table)

    def masked_in(self, table: str) -> tuple[str, ...]:
        return tuple(c.rsplit(".", 1)[1] for c in self.masked if c.rsplit(".", 1)[0] == table)

    def tables(self) -> set[str]:
        return {c.rsplit(".", 1)[0] for c in (*self.excluded, *self.masked)}


def rules_in_config(config: Mapping[str, str]) -> tuple[set[str], set[str]]:
    """(excluded, masked) columns as a connector's config in Kafka Connect has them: what a
    change of the rules is measured against."""

    def listed(value: str) -> set[str]:
        return {re.sub(r"\\(.)", r"\1", v) for v in value.split(",") if v}

    masked = set().union(*(listed(v) for k, v in config.items() if k.startswith(MASK_KEY_PREFIX)))
    return listed(config.get("column.exclude.list", "")), masked


def changed_tables(rules: ColumnRules, current: Mapping[str, str] | None) -> tuple[str, ...]:
    """Tables whose excluded or masked columns differ from the connector's current config."""
    if current is None:
        return ()
    excluded, masked = rules_in_config(current)
    differing = (excluded ^ set(rules.excluded)) | (masked ^ set(rules.masked))
    return tuple(sorted({c.rsplit(".", 1)[0] for c in differing}))


@dataclass(frozen=True)
class ColumnLists:
    """What the publication carries of the tables with excluded columns."""

    lists: dict[str, tuple[str, ...]]  # table: the columns published (the others stay home)
    connector_only: dict[str, str]  # table: why its exclusion is Debezium's alone
    changing: tuple[str, ...] = ()  # tables whose list in the publication differs now


def plan_column_lists(
    conn: psycopg.Connection, publication: str, rules: ColumnRules, tables: list[str]
) -> ColumnLists:
    """The column list each captured table with excluded columns gets; refuses rules Postgres
    or Debezium cannot keep (a key column excluded, a non-text column masked, a column that does
    not exist). Reads only."""
    lists: dict[str, tuple[str, ...]] = {}
    connector_only: dict[str, str] = {}
    changing = []
    for table in sorted(rules.tables() & set(tables)):
        schema, name = table.split(".", 1)
        columns = {
            row[0]: (row[1], bool(row[2]))
            for row in conn.execute(
                "SELECT a.attname, t.typname, coalesce(a.attnum = ANY(i.indkey), false) "
                "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_type t ON t.oid = a.atttypid "
                "LEFT JOIN pg_index i ON i.indrelid = c.oid AND (i.indisreplident OR "
                "  i.indisprimary AND c.relreplident = 'd') "
                "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 "
                "AND NOT a.attisdropped ORDER BY a.attnum",
                [schema, name],
            )
        }
        for column in (*rules.excluded_in(table), *rules.masked_in(table)):
            if column not in columns:
                raise ConnectorConfigError(f"{table} has no column {column!r}")
        for column in rules.masked_in(table):
            if columns[column][0] not in TEXT_TYPES:
                raise ConnectorConfigError(
                    f"{table}.{column} is {columns[column][0]}: only text columns are masked "
                    "(exclude it instead)"
                )
        excluded = rules.excluded_in(table)
        keys = [c for c in (*excluded, *rules.masked_in(table)) if columns[c][1]]
        if keys:
            raise ConnectorConfigError(
                f"{table}: {', '.join(keys)} identifies its rows (primary key or replica "
                "identity): Postgres publishes it with every UPDATE and DELETE and it is every "
                "message's key, so it can be neither excluded nor masked"
            )
        if not excluded:
            continue
        identity = conn.execute(
            "SELECT c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            [schema, name],
        ).fetchone()
        if identity and identity[0] == "f":
            connector_only[table] = (
                "REPLICA IDENTITY FULL: the WAL carries every column, the connector drops "
                f"{', '.join(excluded)}"
            )
            continue
        lists[table] = tuple(c for c in columns if c not in excluded)
        now = conn.execute(
            "SELECT attnames FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s "
            "AND tablename = %s",
            [publication, schema, name],
        ).fetchone()
        if now is None or tuple(now[0] or ()) != lists[table]:
            changing.append(table)
    return ColumnLists(lists, connector_only, tuple(changing))


def sync_published_tables(
    conn: psycopg.Connection,
    publication: str,
    lists: Mapping[str, tuple[str, ...]],
    filters: Mapping[str, str],
) -> None:
    """Give every table of the publication its column list (`lists`, tables with excluded
    columns) and its row filter (`filters`, connectors/row_filters.py, in Postgres's spelling),
    and neither to the others: each table that differs is dropped from the publication and added
    again with both, in one transaction (no change of another transaction is decoded in
    between)."""
    name = sql.Identifier(publication)
    published = conn.execute(
        "SELECT n.nspname, c.relname, r.prattrs IS NOT NULL, pg_get_expr(r.prqual, r.prrelid), "
        "(SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a "
        " WHERE a.attrelid = c.oid AND a.attnum = ANY(r.prattrs)) "
        "FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
        "JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.pubname = %s",
        [publication],
    ).fetchall()
    for schema, table, listed, condition, columns in published:
        qualified_name = f"{schema}.{table}"
        wanted_list, wanted_filter = lists.get(qualified_name), filters.get(qualified_name)
        now_list = tuple(columns or ()) if listed else None
        if now_list == wanted_list and condition == wanted_filter:
            continue
        spec: sql.Composable = sql.Identifier(schema, table)
        if wanted_list is not None:
            spec = sql.SQL("{} ({})").format(
                spec, sql.SQL(", ").join(map(sql.Identifier, wanted_list))
            )
        if wanted_filter is not None:
            spec = sql.SQL("{} WHERE ({})").format(spec, sql.SQL(wanted_filter))
        with conn.transaction():
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                    name, sql.Identifier(schema, table)
                )
            )
            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(name, spec))


# Around the application's ALTER TABLE (and after its CREATE TABLE): see the module docstring.
LIFT_TRIGGER, LIST_TRIGGER = "projector_lift_column_lists", "projector_publish_columns"
LIFT_FUNCTION_BODY = """
DECLARE
  listed record;
BEGIN
  FOR listed IN
    SELECT n.nspname, c.relname FROM pg_publication_rel r
    JOIN pg_publication p ON p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE p.pubname = {publication} AND (r.prattrs IS NOT NULL OR r.prqual IS NOT NULL)
  LOOP
    EXECUTE format('ALTER PUBLICATION %I DROP TABLE %I.%I', {publication}, listed.nspname,
                   listed.relname);
    EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', {publication}, listed.nspname,
                   listed.relname);
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'projector: lifting column lists and row filters failed: % (run projector connectors apply)',
                SQLERRM;
END
"""
LIST_FUNCTION_BODY = """
DECLARE
  published record;
  wanted text;
  wanted_attnums text;
  condition text;
  spec text;
BEGIN
  FOR published IN
    SELECT n.nspname, c.relname, c.oid, c.relreplident, r.prattrs,
           pg_get_expr(r.prqual, r.prrelid) AS qual FROM pg_publication_rel r
    JOIN pg_publication p ON p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE p.pubname = {publication}
      AND format('%s.%s', n.nspname, c.relname) = ANY ({tables}::text[])
  LOOP
    condition := ({conditions}::text[])[
      array_position({filtered}::text[], format('%s.%s', published.nspname, published.relname))];
    wanted := NULL;
    wanted_attnums := NULL;
    IF published.relreplident <> 'f' AND EXISTS (
         SELECT 1 FROM unnest({excluded}::text[]) e
         WHERE e LIKE format('%s.%s.%%', published.nspname, published.relname)) THEN
      SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
             string_agg(a.attnum::text, ' ' ORDER BY a.attnum)
      INTO wanted, wanted_attnums
      FROM pg_attribute a
      WHERE a.attrelid = published.oid AND a.attnum > 0 AND NOT a.attisdropped
        AND format('%s.%s.%s', published.nspname, published.relname, a.attname)
            <> ALL ({excluded}::text[]);
    END IF;
    IF published.prattrs::text IS DISTINCT FROM wanted_attnums
       OR published.qual IS DISTINCT FROM condition THEN
      spec := format('%I.%I', published.nspname, published.relname);
      IF wanted IS NOT NULL THEN
        spec := spec || ' (' || wanted || ')';
      END IF;
      IF condition IS NOT NULL THEN
        spec := spec || ' WHERE (' || condition || ')';
      END IF;
      EXECUTE format('ALTER PUBLICATION %I DROP TABLE %I.%I', {publication},
                     published.nspname, published.relname);
      EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {publication}, spec);
    END IF;
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'projector: setting column lists and row filters failed: % (run projector connectors apply)',
                SQLERRM;
END
"""


def install_column_guard(
    conn: psycopg.Connection,
    publication: str,
    rules: ColumnRules,
    filters: Mapping[str, str] | None = None,
) -> bool:
    """The two event triggers of the module docstring (replaced on every apply, dropped when no
    column is excluded and no row is filtered: a row filter, connectors/row_filters.py, is lost
    by the same DROP and ADD, and set again the same way). False when the admin role may not
    create event triggers."""
    excluded = list(rules.excluded)
    filters = dict(filters or {})
    bodies = {
        LIFT_TRIGGER: sql.SQL(LIFT_FUNCTION_BODY).format(publication=sql.Literal(publication)),
        LIST_TRIGGER: sql.SQL(LIST_FUNCTION_BODY).format(
            publication=sql.Literal(publication),
            tables=sql.Literal(sorted({c.rsplit(".", 1)[0] for c in excluded} | set(filters))),
            excluded=sql.Literal(excluded),
            filtered=sql.Literal(list(filters)),
            conditions=sql.Literal(list(filters.values())),
        ),
    }
    events = {
        LIFT_TRIGGER: "ddl_command_start WHEN TAG IN ('ALTER TABLE')",
        LIST_TRIGGER: "ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')",
    }
    try:
        with conn.transaction():
            for trigger, body in bodies.items():
                function = sql.Identifier("debezium", trigger)
                conn.execute(
                    sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(trigger))
                )
                if not excluded and not filters:
                    continue
                conn.execute(
                    sql.SQL(
                        "CREATE OR REPLACE FUNCTION {}() RETURNS event_trigger LANGUAGE plpgsql "
                        "SECURITY DEFINER SET search_path = pg_catalog AS {}"
                    ).format(function, sql.Literal(body.as_string(conn)))
                )
                conn.execute(
                    sql.SQL(
                        "CREATE EVENT TRIGGER {} ON " + events[trigger] + " EXECUTE FUNCTION {}()"
                    ).format(sql.Identifier(trigger), function)
                )
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True
