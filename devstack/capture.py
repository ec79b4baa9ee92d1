"""Create a benchmark's tables in Postgres and have the connector capture their schema."""

from __future__ import annotations

import psycopg

from connectors import ConnectClient, apply_connector


def create_and_capture(env: dict[str, str], ddl: str, schema: str) -> None:
    """Run the benchmark's DDL and add its schema to what the connector captures."""
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        for statement in ddl.split(";"):
            if statement.strip():
                conn.execute(statement)
    capture = ",".join(dict.fromkeys([*env.get("CAPTURE", "public").split(","), schema]))
    apply_connector(
        ConnectClient(env["CONNECT_URL"]), env["ADMIN_DSN"], {**env, "CAPTURE": capture}
    )
