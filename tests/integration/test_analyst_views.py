"""Analysts' views (docs/analysts.md): a BI tool's driver connects to the ClickHouse the projector
writes to, runs the metadata queries tools issue, and reads a replica's current rows through its
view: no `FINAL`, no metadata columns, the same rows Postgres has.

clickhouse-connect is the driver Superset uses, the ClickHouse JDBC driver v2 the one Metabase,
DBeaver and DataGrip use (driven by tests/integration/jdbc/AnalystProbe.java, the calls those tools
make to browse); both talk to `projector chdb-server` (or the server PROJECTOR_TEST_CLICKHOUSE_URL
names) over ClickHouse's HTTP interface.
"""

from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect

from devstack.artifacts import fetch_jdbc_driver
from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess


def test_a_bi_driver_reads_current_rows_through_the_views(
    stack: StackHandle, tmp_path: Path, clickhouse_server: str
) -> None:
    projector = ProjectorProcess(stack, tmp_path, server_url=clickhouse_server)
    table = projector.table("gadgets")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, price numeric(10,2))")
    stack.apply()
    stack.sql(f"INSERT INTO {table} SELECT n, 'g' || n, n * 1.25 FROM generate_series(1, 40) n")
    stack.sql(f"UPDATE {table} SET price = price + 100 WHERE id % 4 = 0")
    stack.sql(f"DELETE FROM {table} WHERE id % 5 = 0")
    projector.catch_up()

    url = urlsplit(clickhouse_server)
    client = clickhouse_connect.get_client(
        host=url.hostname, port=url.port, username=url.username, password=url.password or ""
    )  # its own start-up asks the server's version, time zone and settings
    view_database = projector.replica_db.removesuffix("replica_public") + "public"
    # What BI tools ask before any data: versions, time zone, databases, tables, columns.
    assert client.command("SELECT version()")
    assert client.command("SELECT timezone()")
    databases = {row[0] for row in client.query("SHOW DATABASES").result_rows}
    assert {view_database, projector.replica_db} <= databases
    listed = {row[0] for row in client.query("SELECT name FROM system.databases").result_rows}
    assert view_database in listed
    tables = {row[0] for row in client.query(f"SHOW TABLES FROM {view_database}").result_rows}
    assert table in tables
    described = client.query(f"DESCRIBE TABLE {view_database}.{table}").result_rows
    assert [row[0] for row in described] == ["id", "name", "price"]  # no metadata columns
    settings = client.query(
        "SELECT name, value FROM system.settings WHERE name IN ('max_result_rows', 'readonly')"
    ).result_rows
    assert {row[0] for row in settings} == {"max_result_rows", "readonly"}

    # The rows: one per live key, as Postgres has them (computed by Postgres, not by us).
    ((count, total),) = stack.sql(f"SELECT count(*), sum(price) FROM {table}")
    read = client.query(f"SELECT count(), sum(price) FROM {view_database}.{table}").result_rows
    assert (read[0][0], Decimal(str(read[0][1]))) == (count, total)
    source = stack.sql(f"SELECT id, name, price FROM {table} ORDER BY id")
    rows = client.query(f"SELECT id, name, price FROM {view_database}.{table} ORDER BY id")
    assert [(r[0], r[1], Decimal(str(r[2]))) for r in rows.result_rows] == [
        (i, n, p) for i, n, p in source
    ]
    # Without the view, the same count needs FINAL and the deletion flag: what it saves.
    raw = client.command(f"SELECT count() FROM {projector.replica_db}.{table}")
    assert int(raw) > count

    # The JDBC driver, browsing as Metabase and DBeaver do: databases, tables, columns, a query.
    # (`compress=false`: `projector chdb-server` does not compress answers; a server does.)
    jars = fetch_jdbc_driver(stack.stack.settings)
    probe = Path(__file__).parent / "jdbc" / "AnalystProbe.java"
    classes = tmp_path / "classes"
    compiled = subprocess.run(
        ["javac", "-d", str(classes), "-cp", f"{jars}/*", str(probe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compiled.returncode == 0, compiled.stderr
    jdbc_url = f"jdbc:clickhouse://{url.hostname}:{url.port}?compress=false"
    ran = subprocess.run(
        [
            "java",
            "-cp",
            f"{jars}/*:{classes}",
            "AnalystProbe",
            jdbc_url,
            url.username or "default",
            url.password or "",
            view_database,
            table,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    facts: dict[str, list[str]] = {}
    for line in ran.stdout.splitlines():
        kind, _, value = line.partition("\t")
        facts.setdefault(kind, []).append(value)
    assert facts["product"][0].startswith("ClickHouse")
    assert view_database in facts["schema"] and table in facts["table"]
    assert facts["column"] == ["id", "name", "price"]
    assert (int(facts["count"][0]), Decimal(facts["total"][0])) == (count, total)
