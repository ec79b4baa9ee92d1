"""Row filters (connectors/row_filters.py) on the real stack: only the matching rows leave
Postgres, on every path.

A table filtered on `region = 'eu'` (REPLICA IDENTITY FULL, so Postgres can filter UPDATEs and
DELETEs on a non-key column) takes inserts on both sides of the filter, updates moving rows out
of it and into it, deletes, and the application's ALTER TABLE that retypes a column (the
projector then asks for a re-read: an incremental snapshot, which must keep the filter too, as
must the publication across the DDL). Afterwards the replica equals the matching rows of
Postgres, `projector verify` agrees, and Kafka never held a row of the other region. Filters
Postgres would refuse, or that would break the application's UPDATEs, are refused by apply.
"""

from __future__ import annotations

import subprocess
import time

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, normalise
from tests.integration.test_rebuild_snapshot import snapshot_reads


def dry_run(projector: ProjectorProcess, filters: str) -> subprocess.CompletedProcess[str]:
    return projector.cli("connectors", "apply", "--dry-run", env={"ROW_FILTERS": filters})


@one_backend("chdb")
def test_only_matching_rows_leave_postgres_through_streaming_ddl_and_re_reads(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table, plain = projector.table("rf_sales"), projector.table("rf_plain")
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.public.{table}"
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, region text, amount int)")
    stack.sql(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    stack.sql(f"CREATE TABLE {plain} (id int PRIMARY KEY, region text)")
    filters = f"public.{table}=region = 'eu'"
    try:
        # refused: a filter on a column outside the replica identity would fail the
        # application's UPDATEs and DELETEs; a condition Postgres does not take
        refused = dry_run(projector, f"public.{plain}=region = 'eu'")
        said = " ".join((refused.stdout + refused.stderr).split())
        assert refused.returncode != 0 and "REPLICA IDENTITY FULL" in said, said
        refused = dry_run(projector, f"public.{table}=no_such_column = 1")
        said = " ".join((refused.stdout + refused.stderr).split())
        assert refused.returncode != 0 and "Postgres refuses" in said, said
        assert not stack.sql("SELECT 1 FROM pg_publication WHERE pubname LIKE 'projector_probe%'")
        shown = dry_run(projector, filters)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"row filter public.{table}: WHERE (region = 'eu'::text)" in shown.stdout, (
            shown.stdout
        )

        applied = projector.cli("connectors", "apply", env={"ROW_FILTERS": filters}, timeout_s=300)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        ((condition,),) = stack.sql(
            "SELECT rowfilter FROM pg_publication_tables WHERE tablename = %s", [table]
        )
        assert condition == "(region = 'eu'::text)", condition

        for i in range(1, 41):
            region = "eu" if i % 2 else "us"
            stack.sql(f"INSERT INTO {table} VALUES ({i}, '{region}', {i * 10})")
        stack.sql(f"UPDATE {table} SET region = 'us' WHERE id IN (1, 3)")  # out of the filter
        stack.sql(f"UPDATE {table} SET region = 'eu' WHERE id IN (2, 4)")  # into it
        stack.sql(f"UPDATE {table} SET amount = amount + 1 WHERE id IN (5, 6)")  # eu, us
        stack.sql(f"DELETE FROM {table} WHERE id IN (7, 8)")
        # the application's migration: the filter stays, and the projector's re-read keeps it
        stack.sql(f"ALTER TABLE {table} ALTER COLUMN amount TYPE text")
        ((condition,),) = stack.sql(
            "SELECT rowfilter FROM pg_publication_tables WHERE tablename = %s", [table]
        )
        assert condition == "(region = 'eu'::text)", condition
        stack.sql(f"UPDATE {table} SET amount = 'changed' WHERE id IN (9, 10)")
        projector.catch_up()

        expected = {
            r[0]: r
            for r in stack.sql(f"SELECT id, region, amount FROM {table} WHERE region = 'eu'")
        }
        # the re-read the retyping asked for: every matching row read, and nothing else
        deadline = time.monotonic() + 180
        while {int(v["after"]["id"]) for _, v in snapshot_reads(stack, topic)} != set(expected):
            reads = {int(v["after"]["id"]) for _, v in snapshot_reads(stack, topic)}
            assert reads <= set(expected), sorted(reads - set(expected))
            assert time.monotonic() < deadline, (sorted(reads), sorted(expected))
            time.sleep(2)
        projector.catch_up()

        replica = {
            int(r["id"]): (int(r["id"]), r["region"], r["amount"])
            for r in projector.sql(
                f"SELECT id, region, amount FROM {projector.replica_db}.{table} FINAL"
            )
        }
        assert {k: tuple(map(normalise, v)) for k, v in replica.items()} == {
            k: tuple(map(normalise, v)) for k, v in expected.items()
        }
        # Kafka never held a row of the other region
        decoder = stack.decoder()
        for message in stack.messages_to_end(topic):
            event = decoder.decode_part(message.value()) if message.value() else None
            images = [(event or {}).get("before"), (event or {}).get("after")]
            assert all(i["region"] == "eu" for i in images if i), (message.offset(), event)
        verified = projector.cli("verify", f"public.{table}", timeout_s=300)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        # the suite's other tests capture without filters
        projector.cli("connectors", "apply", timeout_s=300)
