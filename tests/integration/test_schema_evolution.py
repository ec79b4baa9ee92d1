"""Renamed source columns: refused into the DLQ with a reason until an upcaster is declared, then
replayed from the DLQ — nothing silently lost, the replica equal to Postgres. Declared type
conversions."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source


def dead_letters(projector: ProjectorProcess, topic: str) -> list[dict[str, str]]:
    return projector.sql(
        f"SELECT offset, stage, error FROM {projector.control_db}.dlq FINAL WHERE topic = '{topic}' "
        "AND replayed = 0 ORDER BY offset"
    )


def project_then_change(
    stack: StackHandle,
    projector: ProjectorProcess,
    table: str,
    columns: str,
    first_row: str,
    change: str,
    *then: str,
) -> list[dict[str, str]]:
    """Create and project `table` with one row, apply the schema `change` and the statements
    `then`, project again: the dead letters of the table that the change caused."""
    stack.sql(f"CREATE TABLE {table} ({columns})")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES {first_row}")
    projector.catch_up()
    stack.sql(f"ALTER TABLE {table} {change}")
    for statement in then:
        stack.sql(statement.format(table=table))
    projector.catch_up()
    return dead_letters(projector, f"cdc.public.{table}")


def declare_and_replay(
    projector: ProjectorProcess, tmp_path: Path, table: str, declaration: str
) -> str:
    """Declare `declaration` (TOML keys) as the table's upcaster and replay its dead letters."""
    upcasters = tmp_path / "upcasters.toml"
    upcasters.write_text(f'[[upcaster]]\ntable = "public.{table}"\n{declaration}\n')
    projector.env["PROJECTOR_UPCASTERS_FILE"] = str(upcasters)
    replay = projector.cli("dlq", "replay", "--topic", f"cdc.public.{table}", timeout_s=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    return replay.stdout + replay.stderr


@one_backend("chdb")
def test_renamed_column_is_refused_then_applied_under_a_declared_rename(
    stack: StackHandle, projector: ProjectorProcess, tmp_path: Path
) -> None:
    table = projector.table("ev_rename")
    refused = project_then_change(
        stack,
        projector,
        table,
        "id int PRIMARY KEY, note text, qty int",
        "(1, 'first', 1)",
        "RENAME COLUMN note TO remark",
        "INSERT INTO {table} VALUES (2, 'second', 2)",
        "UPDATE {table} SET remark = 'first, edited' WHERE id = 1",
    )
    assert len(refused) == 2, refused
    assert all(
        d["stage"] == "schema" and "looks renamed to remark" in d["error"] for d in refused
    ), refused

    out = declare_and_replay(projector, tmp_path, table, 'renames = { note = "remark" }')
    assert "replayed 2, still dead 0" in out, out
    stack.sql(f"INSERT INTO {table} VALUES (3, 'third', 3)")  # and new events flow again
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 3
    columns = projector.sql(
        f"SELECT name FROM system.columns WHERE database = '{projector.replica_db}' "
        f"AND table = '{table}' AND name NOT LIKE '\\_%' ORDER BY position"
    )
    assert [c["name"] for c in columns] == ["id", "remark", "qty"]


@one_backend("server")
def test_a_declared_retype_converts_the_stored_values_in_place(
    stack: StackHandle, projector: ProjectorProcess, tmp_path: Path
) -> None:
    """An undeclared retype re-reads the table (test_schema_changes.py); a declared one casts
    the replica column instead (`MODIFY COLUMN`), for a change whose cast is exact."""
    table = projector.table("ev_retype")
    upcasters = tmp_path / "upcasters.toml"
    upcasters.write_text(f'[[upcaster]]\ntable = "public.{table}"\nretypes = {{ qty = "Int64" }}\n')
    projector.env["PROJECTOR_UPCASTERS_FILE"] = str(upcasters)
    refused = project_then_change(
        stack,
        projector,
        table,
        "id int PRIMARY KEY, qty int NOT NULL",
        "(1, 10)",
        "ALTER COLUMN qty TYPE bigint",
        "INSERT INTO {table} VALUES (2, 9000000000)",
    )
    assert refused == []
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 2
    assert "requested an incremental snapshot" not in projector.log.read_text()


@one_backend("chdb")
def test_a_broken_upcasters_file_stops_start_up_with_a_clear_error(
    projector: ProjectorProcess, tmp_path: Path
) -> None:
    broken = tmp_path / "upcasters.toml"
    broken.write_text('[[upcaster]]\ntable = "no_schema_here"\n')
    result = projector.cli(
        "run", "--until-caught-up", env={"PROJECTOR_UPCASTERS_FILE": str(broken)}
    )
    assert result.returncode == 2
    assert "upcasters file" in result.stderr and "table" in result.stderr, result.stderr
