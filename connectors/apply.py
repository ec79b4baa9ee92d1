"""`projector connectors apply`: bring Postgres and Kafka Connect to the state the files describe.

Steps, in order (each is idempotent, so running apply twice changes nothing the second time):
1. render the connector JSON from the environment (placeholders, CAPTURE → table.include.list);
2. on Postgres: control tables (signal, heartbeat), SELECT grants for the CDC role, and the
   filtered publication synced to exactly the captured tables;
3. on Kafka Connect: PUT the config (a no-op when unchanged) and wait until every task RUNS;
4. tables that joined an already existing publication get their existing rows through a Debezium
   incremental snapshot (a row in the signal table), so nobody restarts anything by hand. Debezium
   3.6 cannot snapshot a table whose schema it has not loaded yet (it fails building the schema
   change event for it), and it loads schemas when its task starts: so apply restarts the task
   first, then signals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psycopg

from connectors.client import ConnectClient
from connectors.config import CaptureSpec, render_connector
from connectors.source import (
    PublicationChange,
    captured_tables,
    ensure_control_tables,
    grant_select,
    request_incremental_snapshot,
    sync_publication,
)


@dataclass(frozen=True)
class ApplyResult:
    connector: str
    config_changed: bool
    tables: tuple[str, ...]
    publication: PublicationChange
    snapshot_signal: str | None


def apply_connector(client: ConnectClient, admin_dsn: str, env: Mapping[str, str]) -> ApplyResult:
    definition = render_connector(env)
    name, config = definition["name"], definition["config"]
    capture = CaptureSpec.parse(env.get("CAPTURE"))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        ensure_control_tables(conn, config["database.user"])
        tables = captured_tables(conn, capture)
        grant_select(conn, capture, tables, config["database.user"])
        change = sync_publication(conn, config["publication.name"], tables)
        changed = client.put_config(name, config)
        client.wait_running(name)
        signal = None
        if change.added and not change.created:
            client.bounce(name)
            signal = request_incremental_snapshot(conn, list(change.added))
    return ApplyResult(name, changed, tuple(tables), change, signal)
