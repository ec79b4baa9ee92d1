"""Schema changes that happen in real life, applied without anyone declaring anything:
a retype re-reads the table from Postgres (its rewrite never reaches the WAL), a dropped
column is NULL for later rows, a drop plus an add seen in one step is no rename, and a table
created later in a captured schema is captured without `connectors apply`."""

from __future__ import annotations

import time

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source


def dead_letters(projector: ProjectorProcess, table: str) -> list[dict[str, str]]:
    return projector.sql(
        f"SELECT offset, stage, error FROM {projector.control_db}.dlq FINAL "
        f"WHERE topic = 'cdc.public.{table}' AND replayed = 0 ORDER BY offset"
    )


def catch_up_until_equal(
    stack: StackHandle, projector: ProjectorProcess, table: str, timeout_s: float = 180
) -> int:
    """Catch up until the replica equals Postgres: an incremental snapshot's reads may still
    arrive after a fence (Debezium reads chunks while it streams). Fails with the last
    difference if they never come."""
    deadline = time.monotonic() + timeout_s
    while True:
        projector.catch_up()
        try:
            return assert_replica_equals_source(stack, projector, table, ["id"])
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def created_and_projected(
    stack: StackHandle, projector: ProjectorProcess, prefix: str, columns: str, *rows: str
) -> str:
    table = projector.table(prefix)
    stack.sql(f"CREATE TABLE {table} ({columns})")
    stack.apply()
    for row in rows:
        stack.sql(f"INSERT INTO {table} VALUES {row}")
    projector.catch_up()
    return table


@one_backend("server")
def test_a_retype_re_reads_the_table_from_postgres(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    """`USING qty * 1000`: the stored values change inside Postgres, and no event says so. A
    cast of the replica's values would keep 1 and 2; only a re-read gives 1000 and 2000."""
    table = created_and_projected(
        stack,
        projector,
        "sc_retype",
        "id int PRIMARY KEY, qty int NOT NULL, note text",
        "(1, 1, 'a')",
        "(2, 2, 'b')",
    )
    stack.sql(f"ALTER TABLE {table} ALTER COLUMN qty TYPE bigint USING qty * 1000")
    stack.sql(f"INSERT INTO {table} VALUES (3, 9000000000, 'c')")
    assert catch_up_until_equal(stack, projector, table) == 3
    assert dead_letters(projector, table) == []
    assert "requested an incremental snapshot" in projector.log.read_text()


@one_backend("chdb")
def test_a_dropped_not_null_column_is_null_for_later_rows(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = created_and_projected(
        stack,
        projector,
        "sc_drop",
        "id int PRIMARY KEY, qty int NOT NULL, note text",
        "(1, 5, 'a')",
    )
    # A column added with a default (the replica column gets it, for rows stored before)
    stack.sql(f"ALTER TABLE {table} ADD COLUMN flag int NOT NULL DEFAULT 7")
    stack.sql(f"INSERT INTO {table} VALUES (2, 6, 'b', 8)")
    projector.catch_up()
    stack.sql(f"ALTER TABLE {table} DROP COLUMN qty, DROP COLUMN flag")
    stack.sql(f"INSERT INTO {table} (id, note) VALUES (3, 'c')")
    stack.sql(f"UPDATE {table} SET note = 'b, edited' WHERE id = 2")
    projector.catch_up()
    assert projector.sql(
        f"SELECT id, qty, flag, note FROM {projector.replica_db}.{table} FINAL ORDER BY id"
    ) == [
        {"id": 1, "qty": 5, "flag": 7, "note": "a"},  # stored before: kept
        {"id": 2, "qty": None, "flag": None, "note": "b, edited"},  # changed after: NULL
        {"id": 3, "qty": None, "flag": None, "note": "c"},
    ]
    assert dead_letters(projector, table) == []


@one_backend("server")
def test_a_dropped_and_an_added_column_in_one_step_are_not_refused_as_a_rename(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    """The added column is appended where the dropped last one was: by position it looks like
    a rename. Either way the replica takes the new column and re-reads the stored rows."""
    table = created_and_projected(
        stack,
        projector,
        "sc_swap",
        "id int PRIMARY KEY, note text, qty int",
        "(1, 'a', 1)",
        "(2, 'b', 2)",
    )
    stack.sql(f"ALTER TABLE {table} DROP COLUMN qty, ADD COLUMN amount int DEFAULT 42")
    stack.sql(f"INSERT INTO {table} VALUES (3, 'c', 3)")
    assert catch_up_until_equal(stack, projector, table) == 3
    assert dead_letters(projector, table) == []


@one_backend("chdb")
def test_a_table_created_later_in_a_captured_schema_is_captured_without_apply(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    """No `connectors apply` after the CREATE TABLEs: the keyed table's rows, from its first,
    reach the replica; the key-less one stays out of the publication, so the application's
    UPDATE and DELETE on it still work."""
    stack.apply()  # the deployment as it stands (installs what follows new tables)
    table, keyless = projector.table("sc_new"), projector.table("sc_new_keyless")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    stack.sql(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
    stack.sql(f"UPDATE {table} SET note = 'b, edited' WHERE id = 2")
    stack.sql(f"CREATE TABLE {keyless} (id int, note text)")
    stack.sql(f"INSERT INTO {keyless} VALUES (1, 'a')")
    stack.sql(f"UPDATE {keyless} SET note = 'edited'")  # fails if published without identity
    stack.sql(f"DELETE FROM {keyless}")
    assert catch_up_until_equal(stack, projector, table) == 2
    published = stack.sql(
        "SELECT tablename FROM pg_publication_tables WHERE tablename IN (%s, %s)", [table, keyless]
    )
    assert published == [(table,)]
