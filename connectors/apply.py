"""`projector connectors apply`: bring Postgres and Kafka Connect to the state the files describe.

First the plan (`plan_apply`, which only reads: it is what `--dry-run` prints):
A. render the connector JSON from the environment (placeholders, CAPTURE → table.include.list);
B. find the tables CAPTURE covers and, among them, those Postgres could not publish UPDATEs and
   DELETEs of (no primary key and no other replica identity): in the publication, every UPDATE
   and DELETE the application runs on such a table fails. They are left out (a warning names each
   with its remedy), in the publication and in Debezium's include list alike — unless the operator
   opts in (`--set-replica-identity-full`, or SET_REPLICA_IDENTITY_FULL=true), and then they get
   REPLICA IDENTITY FULL before they join the publication;
C. diff the publication and the connector config against what exists.

Then the steps, in order (each is idempotent, so running apply twice changes nothing the second
time):
1. on Postgres: control tables (signal, heartbeat), REPLICA IDENTITY FULL where opted in, SELECT
   grants for the CDC role, and the filtered publication synced to exactly the captured tables —
   identity before publication, so no moment exists at which the application's statements fail;
   and the event trigger that adds tables created later in a captured schema (those with a key)
   to the publication in the transaction that creates them, so nobody runs apply for them;
2. on Kafka Connect: PUT the config (a no-op when unchanged) and wait until every task RUNS —
   after a change, RUNS the new config: Connect passes it to the tasks asynchronously, so apply
   waits for the stored task configs and restarts the tasks (a masking rule holds from then on);
3. tables that joined an already existing publication get their existing rows through a Debezium
   incremental snapshot (a row in the signal table), so nobody restarts anything by hand. Debezium
   3.6 cannot snapshot a table whose schema it has not loaded yet (it fails building the schema
   change event for it), and it loads schemas when its task starts: so apply restarts the task
   first, then signals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from connectors.client import ConnectClient
from connectors.columns import (
    MASK_KEY_PREFIX,
    ColumnLists,
    ColumnRules,
    changed_tables,
    install_column_guard,
    plan_column_lists,
    sync_published_tables,
)
from connectors.config import CaptureSpec, render_connector
from connectors.row_filters import (
    FILTER_SETTING,
    RowFilters,
    parse_row_filters,
    plan_row_filters,
    snapshot_overrides,
)
from connectors.source import (
    IdentityGap,
    PublicationChange,
    captured_tables,
    ensure_control_tables,
    grant_select,
    has_rows,
    identity_gaps,
    install_capture_trigger,
    plan_publication,
    request_incremental_snapshot,
    set_replica_identity_full,
    sync_publication,
    without_primary_key,
)

# The environment's opt-in, for deployments that run apply without flags (docker-compose).
IDENTITY_OPT_IN = "SET_REPLICA_IDENTITY_FULL"
SECRET_MASK = "***"


@dataclass(frozen=True)
class ConfigChange:
    """How the connector config in Kafka Connect differs from the rendered one."""

    created: bool  # no connector of that name yet
    added: dict[str, str]
    removed: dict[str, str]
    changed: dict[str, tuple[str, str]]  # key → (now, after apply)

    @classmethod
    def between(cls, current: Mapping[str, str] | None, desired: Mapping[str, str]) -> ConfigChange:
        now = dict(current or {})
        return cls(
            current is None,
            {_key(k): _shown(k, v) for k, v in desired.items() if k not in now},
            {_key(k): _shown(k, v) for k, v in now.items() if k not in desired},
            {
                _key(k): (_shown(k, now[k]), _shown(k, v))
                for k, v in desired.items()
                if k in now and now[k] != v
            },
        )

    def __bool__(self) -> bool:
        return bool(self.created or self.added or self.removed or self.changed)


def _shown(key: str, value: str) -> str:
    """A config value as a diff may print it: secrets masked."""
    return SECRET_MASK if "password" in key or "secret" in key else value


def _key(key: str) -> str:
    """A config key as a diff may print it: the masking salt is in its name."""
    return MASK_KEY_PREFIX + SECRET_MASK if key.startswith(MASK_KEY_PREFIX) else key


@dataclass(frozen=True)
class ApplyPlan:
    connector: str
    config: dict[str, str]
    config_change: ConfigChange
    tables: tuple[str, ...]  # captured: in the publication afterwards
    publication: PublicationChange
    left_out: tuple[IdentityGap, ...]  # covered by CAPTURE, not captured (no replica identity)
    identity_full: tuple[IdentityGap, ...]  # get REPLICA IDENTITY FULL first (opted in)
    snapshot: tuple[str, ...]  # tables whose existing rows an incremental snapshot will bring
    # Tables joining a running capture whose existing rows will not arrive: Debezium's
    # incremental snapshot needs a primary key (only their changes from now on are captured).
    not_snapshotted: tuple[str, ...] = ()
    rules: ColumnRules = field(default_factory=ColumnRules)  # excluded and masked columns
    column_lists: ColumnLists = field(default_factory=lambda: ColumnLists({}, {}))
    reread: tuple[str, ...] = ()  # captured tables whose rules changed: snapshotted again
    row_filters: RowFilters = field(default_factory=lambda: RowFilters({}))


@dataclass(frozen=True)
class ApplyResult:
    connector: str
    config_changed: bool
    tables: tuple[str, ...]
    publication: PublicationChange
    snapshot_signal: str | None
    left_out: tuple[IdentityGap, ...] = ()
    identity_full: tuple[IdentityGap, ...] = ()
    not_snapshotted: tuple[str, ...] = ()
    # Tables created later in a captured schema join the publication by themselves (the event
    # trigger of `install_capture_trigger`); False: the admin role may not create it.
    follows_new_tables: bool = True
    reread: tuple[str, ...] = ()  # tables re-read because their excluded/masked columns changed
    # False: no event triggers (not a superuser), so no column lists: excluded columns are left
    # out by the connector alone (they reach Kafka Connect, never Kafka)
    column_lists: bool = True
    row_filters_changed: tuple[str, ...] = ()  # re-read with a new filter (not a removed one)


def opted_in(env: Mapping[str, str], flag: bool = False) -> bool:
    """REPLICA IDENTITY FULL may be set on key-less tables: by the flag, or the environment."""
    return flag or env.get(IDENTITY_OPT_IN, "").strip().lower() in ("1", "true", "yes")


def plan_apply(
    client: ConnectClient,
    conn: psycopg.Connection,
    admin_dsn: str,
    env: Mapping[str, str],
    set_identity_full: bool = False,
) -> ApplyPlan:
    """Steps A-C: what apply would do. Reads Postgres and Kafka Connect, changes nothing (row
    filters are tried in a session of their own, each try rolled back)."""
    capture = CaptureSpec.parse(env.get("CAPTURE"))
    covered = captured_tables(conn, capture)  # B.
    gaps = tuple(identity_gaps(conn, covered))
    identity_full = gaps if opted_in(env, set_identity_full) else ()
    left_out = () if identity_full else gaps
    skipped = {gap.table for gap in left_out}
    tables = tuple(t for t in covered if t not in skipped)
    definition = render_connector(env, left_out=skipped)  # A.
    name, config = definition["name"], definition["config"]
    row_filters = plan_row_filters(
        admin_dsn,
        config["publication.name"],
        parse_row_filters(env.get(FILTER_SETTING)),
        list(tables),
    )
    config.update(snapshot_overrides(row_filters.filters))
    publication = plan_publication(conn, config["publication.name"], list(tables))  # C.
    current = client.config(name)
    config_change = ConfigChange.between(current, {**config, "name": name})
    joining = () if publication.created else publication.added
    rules = ColumnRules.from_env(env)
    column_lists = plan_column_lists(conn, config["publication.name"], rules, list(tables))
    changed = [t for t in changed_tables(rules, current) if t in tables and t not in joining]
    changed += [t for t in row_filters.changing if t not in changed and t not in joining]
    keyless = without_primary_key(conn, [*joining, *changed])
    reread = tuple(t for t in changed if t not in keyless and has_rows(conn, t))
    return ApplyPlan(
        name,
        config,
        config_change,
        tables,
        publication,
        left_out,
        identity_full,
        snapshot=tuple(t for t in joining if t not in keyless),
        not_snapshotted=tuple(t for t in joining if t in keyless),
        rules=rules,
        column_lists=column_lists,
        reread=reread,
        row_filters=row_filters,
    )


def apply_connector(
    client: ConnectClient,
    admin_dsn: str,
    env: Mapping[str, str],
    set_identity_full: bool = False,
) -> ApplyResult:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        plan = plan_apply(client, conn, admin_dsn, env, set_identity_full)
        # 1. Postgres: an identity before the publication, or the application's UPDATEs fail
        ensure_control_tables(conn, plan.config["database.user"])
        set_replica_identity_full(conn, list(plan.identity_full))
        grant_select(
            conn,
            CaptureSpec.parse(env.get("CAPTURE")),
            list(plan.tables),
            plan.config["database.user"],
        )
        change = sync_publication(conn, plan.config["publication.name"], list(plan.tables))
        # the excluded columns stay home: column lists, kept right across the application's
        # DDL by event triggers (without them a list would fail its DROP COLUMN: none then)
        # and the rows a filter leaves out (connectors/row_filters.py): lists and filters set
        # together, one table at a time; kept right across the DDL by the same triggers
        filters = plan.row_filters.filters
        column_lists = install_column_guard(
            conn, plan.config["publication.name"], plan.rules, filters
        )
        lists = plan.column_lists.lists if column_lists else {}
        sync_published_tables(conn, plan.config["publication.name"], lists, filters)
        follows_new_tables = install_capture_trigger(
            conn,
            plan.config["publication.name"],
            CaptureSpec.parse(env.get("CAPTURE")),
            [gap.table for gap in plan.left_out],
            plan.config["database.user"],
        )
        # 2. Kafka Connect
        before = client.config(plan.connector)
        changed = client.put_config(plan.connector, plan.config)
        updated = changed and not plan.config_change.created
        if updated:
            # Connect hands a changed config to the tasks asynchronously: until a task restarts
            # with it, the old one streams on under the old rules (a masked column in plain
            # text). Once the stored task configs are the new ones, a bounce makes them run.
            removed = [k for k in before or {} if k not in plan.config and k != "name"]
            client.wait_tasks_configured(plan.connector, plan.config, removed)
        client.wait_running(plan.connector)
        # 3. existing rows of tables that joined a running capture (not `plan.snapshot`: the
        # publication is what it is now, and a table without a key cannot be snapshotted)
        signal = None
        if updated or (change.added and not change.created) or plan.reread:
            client.bounce(plan.connector)
        if (change.added and not change.created) or plan.reread:
            keyed = [t for t in change.added if t not in plan.not_snapshotted]
            # and tables whose excluded or masked columns changed: their rows as the rules say
            keyed += [t for t in plan.reread if t not in keyed]
            signal = (
                request_incremental_snapshot(
                    conn, keyed, publication=plan.config["publication.name"]
                )
                if keyed
                else None
            )
    return ApplyResult(
        plan.connector,
        changed,
        plan.tables,
        change,
        signal,
        plan.left_out,
        plan.identity_full,
        plan.not_snapshotted,
        follows_new_tables,
        plan.reread,
        column_lists or not plan.rules.excluded,
        tuple(t for t in plan.row_filters.changing if t in plan.row_filters.filters),
    )


def dry_run(
    client: ConnectClient, admin_dsn: str, env: Mapping[str, str], set_identity_full: bool = False
) -> ApplyPlan:
    """Steps A-C only, in a read-only Postgres session: it cannot change anything there, and it
    only reads Kafka Connect."""
    options = "-c default_transaction_read_only=on"
    with psycopg.connect(admin_dsn, autocommit=True, options=options) as conn:
        return plan_apply(client, conn, admin_dsn, env, set_identity_full)
