"""Renamed and re-typed source columns: refused into the DLQ with a reason until an upcaster is
declared, then replayed from the DLQ — nothing silently lost, the replica equal to Postgres."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source


def dead_letters(projector: ProjectorProcess, topic: str) -> list[dict[str, str]]:
    return projector.sql(
        f"SELECT offset, stage, error FROM {projector.control_db}.dlq FINAL WHERE topic = '{topic}' "
        "AND replayed = 0 ORDER BY offset"
    )


def declare_and_replay(
    projector: ProjectorProcess, tmp_path: Path, table: str, declaration: str
) -> str:
    upcasters = tmp_path / "upcasters.toml"
    upcasters.write_text(declaration)
    projector.env["PROJECTOR_UPCASTERS_FILE"] = str(upcasters)
    replay = subprocess.run(
        [*projector.command, "dlq", "replay", "--topic", f"cdc.public.{table}"],
        env=projector.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stdout + replay.stderr
    return replay.stdout + replay.stderr


def test_renamed_column_is_refused_then_applied_under_a_declared_rename(
    stack: StackHandle, projector: ProjectorProcess, tmp_path: Path
) -> None:
    table = projector.table("ev_rename")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text, qty int)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1, 'first', 1)")
    projector.catch_up()
    stack.sql(f"ALTER TABLE {table} RENAME COLUMN note TO remark")
    stack.sql(f"INSERT INTO {table} VALUES (2, 'second', 2)")
    stack.sql(f"UPDATE {table} SET remark = 'first, edited' WHERE id = 1")
    projector.catch_up()

    refused = dead_letters(projector, f"cdc.public.{table}")
    assert len(refused) == 2, refused
    assert all(
        d["stage"] == "schema" and "looks renamed to remark" in d["error"] for d in refused
    ), refused

    out = declare_and_replay(
        projector, tmp_path, table,
        f'[[upcaster]]\ntable = "public.{table}"\nrenames = {{ note = "remark" }}\n',
    )  # fmt: skip
    assert "replayed 2, still dead 0" in out, out
    stack.sql(f"INSERT INTO {table} VALUES (3, 'third', 3)")  # and new events flow again
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 3
    columns = projector.sql(
        f"SELECT name FROM system.columns WHERE database = '{projector.replica_db}' "
        f"AND table = '{table}' AND name NOT LIKE '\\_%' ORDER BY position"
    )
    assert [c["name"] for c in columns] == ["id", "remark", "qty"]


def test_retyped_column_is_refused_then_converted_under_a_declared_type(
    stack: StackHandle, projector: ProjectorProcess, tmp_path: Path
) -> None:
    table = projector.table("ev_retype")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, qty int NOT NULL)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1, 10)")
    projector.catch_up()
    stack.sql(f"ALTER TABLE {table} ALTER COLUMN qty TYPE bigint")
    stack.sql(f"INSERT INTO {table} VALUES (2, 9000000000)")
    projector.catch_up()

    refused = dead_letters(projector, f"cdc.public.{table}")
    assert [d["stage"] for d in refused] == ["schema"], refused
    assert "changed type from Int32 to Int64" in refused[0]["error"], refused

    out = declare_and_replay(
        projector,
        tmp_path,
        table,
        f'[[upcaster]]\ntable = "public.{table}"\nretypes = {{ qty = "Int64" }}\n',
    )
    assert "replayed 1, still dead 0" in out, out
    projector.catch_up()
    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 2


def test_a_broken_upcasters_file_stops_start_up_with_a_clear_error(
    projector: ProjectorProcess, tmp_path: Path
) -> None:
    broken = tmp_path / "upcasters.toml"
    broken.write_text('[[upcaster]]\ntable = "no_schema_here"\n')
    env = {**projector.env, "PROJECTOR_UPCASTERS_FILE": str(broken)}
    result = subprocess.run(
        [*projector.command, "run", "--until-caught-up"], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "upcasters file" in result.stderr and "table" in result.stderr, result.stderr
