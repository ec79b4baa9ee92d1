"""Capturing never breaks the writing application: `projector connectors apply` leaves a table out
of the publication when Postgres could not publish its UPDATEs and DELETEs (no primary key and no
replica identity), says so, and captures it only when asked to set REPLICA IDENTITY FULL. A dry
run shows what would change and changes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import psycopg

from tests.integration.conftest import PROJECTOR, StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess


def apply_cli(stack: StackHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """`projector connectors apply ARGS` as an operator runs it (schema public captured)."""
    return subprocess.run(
        [PROJECTOR, "connectors", "apply", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def published(stack: StackHandle) -> set[str]:
    return {
        f"{s}.{t}"
        for s, t in stack.sql(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            [stack.env.get("PUBLICATION_NAME", "projector_pub")],
        )
    }


def replica_identity(stack: StackHandle, table: str) -> str:
    return str(
        stack.sql("SELECT relreplident FROM pg_class WHERE oid = %s::regclass", [table])[0][0]
    )


def included(include_list: str, table: str) -> bool:
    """Whether Debezium's `table.include.list` (regexes matched against the whole name) takes
    `table`; Python's `re` reads these patterns as Java does."""
    return any(re.fullmatch(pattern, table) for pattern in include_list.split(","))


def the_application_writes(stack: StackHandle, table: str) -> None:
    """What the unchanged application does: UPDATE and DELETE rows (raises if Postgres refuses)."""
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET msg = msg || '!' WHERE at = 1")
        conn.execute(f"DELETE FROM {table} WHERE at = 2")


def test_keyless_table_is_left_out_and_the_application_keeps_working(stack: StackHandle) -> None:
    table = f"cs_keyless_{uuid.uuid4().hex[:8]}"
    keyed = f"cs_keyed_{uuid.uuid4().hex[:8]}"
    stack.sql(f"CREATE TABLE {table} (at int, msg text)")
    stack.sql(f"CREATE TABLE {keyed} (id int PRIMARY KEY, msg text)")
    stack.sql(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b'), (3, 'c')")

    result = apply_cli(stack)

    assert result.returncode == 0, result.stderr
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert f"public.{table}" in output, output
    assert f"ALTER TABLE public.{table} REPLICA IDENTITY FULL" in output, output
    assert f"public.{table}" not in published(stack)
    assert f"public.{keyed}" in published(stack)  # keyed tables are captured as before
    the_application_writes(stack, table)  # raised "cannot update table ..." before the fix
    assert stack.sql(f"SELECT at, msg FROM {table} ORDER BY at") == [(1, "a!"), (3, "c")]
    # Debezium is not told to read it either: its initial snapshot would fill a replica that
    # then never changes.
    include = stack.connect.config("pg-source")["table.include.list"]  # type: ignore[index]
    assert not included(include, f"public.{table}"), include
    assert included(include, f"public.{keyed}"), include


@one_backend("server")
def test_replica_identity_full_on_request_captures_the_table_append_only(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("cs_optin")
    stack.sql(f"CREATE TABLE {table} (at int, msg text, big text)")
    stack.sql(f"ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL")  # really TOASTed
    big = "".join(uuid.uuid4().hex for _ in range(200))  # 6.4 kB, incompressible
    stack.sql(f"INSERT INTO {table} VALUES (1, 'a', %s), (2, 'b', %s), (3, 'c', NULL)", [big, big])

    result = apply_cli(stack, "--set-replica-identity-full")

    assert result.returncode == 0, result.stderr
    stderr = " ".join(result.stderr.split())
    assert replica_identity(stack, table) == "f"
    assert f"public.{table}" in published(stack)
    assert f"REPLICA IDENTITY FULL set on public.{table}" in stderr, stderr
    # Debezium's incremental snapshot needs a primary key: apply says the rows already there
    # are not copied.
    not_copied = rf"existing rows of [^:]*public\.{table}\b[^:]* are not copied"
    assert re.search(not_copied, stderr), stderr
    the_application_writes(stack, table)
    stack.sql(f"INSERT INTO {table} VALUES (4, 'd', NULL)")
    projector.catch_up()

    engine = projector.sql(
        f"SELECT engine FROM system.tables WHERE database = '{projector.replica_db}' "
        f"AND name = '{table}'"
    )
    assert engine == [{"engine": "MergeTree"}], engine  # no key: append-only history
    rows = projector.sql(
        f"SELECT at, msg, length(big) AS n, _op FROM {projector.replica_db}.{table} "
        "ORDER BY _offset"
    )
    # The application's changes, in order. The update leaves the TOASTed `big` untouched: its
    # value comes from the event's before-image (REPLICA IDENTITY FULL logs the whole old row),
    # never Debezium's placeholder.
    assert [(r["at"], r["msg"], r["n"], r["_op"]) for r in rows] == [
        (1, "a!", 6400, "u"),
        (2, "b", 6400, "d"),
        (4, "d", None, "c"),
    ]


def test_dry_run_shows_the_changes_and_touches_nothing(stack: StackHandle) -> None:
    keyed = f"cs_dry_{uuid.uuid4().hex[:8]}"
    keyless = f"cs_dry_keyless_{uuid.uuid4().hex[:8]}"
    # Keyed only after CREATE TABLE: a table created with a key joins the publication by
    # itself (test_schema_changes.py), and this one is to wait for apply.
    stack.sql(f"CREATE TABLE {keyed} (id int NOT NULL)")
    stack.sql(f"ALTER TABLE {keyed} ADD PRIMARY KEY (id)")
    stack.sql(f"CREATE TABLE {keyless} (at int, msg text)")
    publication_before = published(stack)
    config_before = stack.connect.config("pg-source")
    signals_before = stack.sql("SELECT count(*) FROM debezium.signal")

    result = apply_cli(stack, "--dry-run", "--set-replica-identity-full", "--capture", "public")

    assert result.returncode == 0, result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert f"+ public.{keyed}" in output, output
    assert f"+ public.{keyless}" in output, output
    assert f"would set REPLICA IDENTITY FULL on public.{keyless}" in output, output
    assert "dry run: nothing was changed" in output, output
    # Nothing touched: publication, replica identity, connector config, signal table.
    assert published(stack) == publication_before
    assert replica_identity(stack, keyless) == "d"
    assert stack.connect.config("pg-source") == config_before
    assert stack.sql("SELECT count(*) FROM debezium.signal") == signals_before

    # Without the opt-in, the dry run names the key-less table as left out and the include
    # list as the config key that changes.
    result = apply_cli(stack, "--dry-run")
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, result.stderr
    assert f"+ public.{keyed}" in output and f"+ public.{keyless}" not in output, output
    assert f"public.{keyless}" in output and "REPLICA IDENTITY FULL" in output, output
    assert "~ table.include.list" in output, output
    assert published(stack) == publication_before

    # The real run does what the dry run said.
    assert apply_cli(stack).returncode == 0
    assert published(stack) - publication_before == {f"public.{keyed}"}
