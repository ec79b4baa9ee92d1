"""Re-reading a table from Postgres: a Debezium incremental snapshot, requested through the
signal table (`connectors.request_incremental_snapshot`).

The projector asks for one when a schema change leaves stored rows it cannot derive from the
change stream: Postgres applies `ALTER COLUMN ... TYPE` by rewriting the table, and that rewrite
never reaches the WAL, so only a fresh read gives the replica the values Postgres now holds
(docs/projector.md, "Schema versions and upcasters"). Debezium emits the snapshot's rows as reads
(`op = r`) at offsets after the change, so they win over every older version of their key.

It writes with the projector's source login (`source_dsn`: by default the connector's own CDC
role, which may write the signal table). An unreachable Postgres is an infrastructure failure
(`SourceUnavailable`: the batch is retried); no source configured at all is logged as an error
with the statement that requests the snapshot by hand, and the batch goes on.
"""

from __future__ import annotations

import json
import logging

from projector.errors import SourceUnavailable

log = logging.getLogger(__name__)


class SignalTable:
    """Requests incremental snapshots of source tables (`schema.table`)."""

    def __init__(self, dsn: str | None, publication: str | None = None) -> None:
        """`publication`: whose row filter a re-read keeps (connectors/row_filters.py)."""
        self.dsn, self.publication = dsn, publication

    def request(self, table: str, reason: str) -> None:
        if not self.dsn:
            log.error(
                "%s must be re-read from Postgres (%s), and no source database is configured "
                "to ask Debezium for it (PROJECTOR_SOURCE_DSN, or the connector's PG_* / "
                "CDC_* variables). Rows not changed since show NULL in the changed column "
                "until then. Request the snapshot by hand: %s",
                table,
                reason,
                manual_request(table),
            )
            return
        import psycopg

        from connectors import request_incremental_snapshot

        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                signal = request_incremental_snapshot(conn, [table], publication=self.publication)
        except psycopg.OperationalError as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SourceUnavailable(
                f"cannot request a re-read of {table} from Postgres: {first_line}"
            ) from exc
        log.warning(
            "%s: %s; requested an incremental snapshot (signal %s): its rows are re-read "
            "from Postgres while streaming goes on",
            table,
            reason,
            signal,
        )


def manual_request(table: str) -> str:
    """The SQL that requests the snapshot through the signal table, for a person to run."""
    data = json.dumps({"data-collections": [table], "type": "incremental"})
    return (
        "INSERT INTO debezium.signal (id, type, data) VALUES "
        f"(gen_random_uuid()::text, 'execute-snapshot', '{data}')"
    )
