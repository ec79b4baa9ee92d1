"""`projector verify` finds exactly the drift injected into ClickHouse (replica rows deleted,
phantom and changed, a read-model row altered) by its keys, and passes while a writer keeps
writing and the projector keeps applying (server backend)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from devstack.shop import ShopWriter
from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.read_model_checks import shop_projection


def write_clickhouse(projector: ProjectorProcess, statements: list[str]) -> None:
    """Change ClickHouse behind the projector's back (it is stopped on chDB): the drift."""
    if projector.server_url is not None:
        for statement in statements:
            httpx.post(projector.server_url, content=statement, timeout=60).raise_for_status()
        return
    script = (
        "import sys, chdb.session as s\n"
        "session = s.Session(sys.argv[1])\n"
        "for statement in sys.argv[2:]:\n"
        "    session.query(statement)\n"
        "session.close()\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, projector.env["PROJECTOR_CHDB_PATH"], *statements],
        check=True,
        timeout=120,
    )


def verify(projector: ProjectorProcess, *args: str) -> tuple[int, dict[str, Any]]:
    result = projector.cli("verify", "--json", *args, timeout_s=300)
    assert result.returncode in (0, 1) and result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def drifting_keys(report: dict[str, Any], name: str) -> set[tuple[str, str, tuple[str, ...]]]:
    (found,) = [r for r in report["results"] if r["name"] == name]
    return {(",".join(d["key"].values()), d["side"], tuple(d["columns"])) for d in found["drift"]}


def test_verify_finds_exactly_the_injected_drift(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)  # embedded chDB, the projector stopped
    schema = shop_projection(stack, projector)
    ShopWriter(stack.admin_dsn, schema, seed=11).run(rate_per_s=0, transactions=60)
    projector.catch_up()
    code, report = verify(projector, "--all")
    assert code == 0, report
    names = {r["name"] for r in report["results"]}
    assert {f"{schema}.orders", f"{schema}.order_items", "order_summary"} <= names, names

    orders = f"`{projector.replica_db[: -len('public')]}{schema}`.orders"
    items = f"`{projector.replica_db[: -len('public')]}{schema}`.order_items"
    ids = [r[0] for r in stack.sql(f"SELECT id FROM {schema}.orders ORDER BY id")]
    lines = stack.sql(f"SELECT order_id, line_no FROM {schema}.order_items ORDER BY 1, 2")
    gone, changed, phantom = ids[0], ids[len(ids) // 2], max(ids) + 1000
    (summary,) = projector.sql(
        f"SELECT name FROM system.tables WHERE database = '{projector.read_model_db}' "
        "AND match(name, '^order_summary__[0-9a-z]+$')"  # the entity's table, not its stage
    )
    # A read-model row altered: only that read model drifts, by that row.
    write_clickhouse(
        projector,
        [
            f"ALTER TABLE `{projector.read_model_db}`.`{summary['name']}` UPDATE customer_name = "
            f"'drift' WHERE order_id = {changed} SETTINGS mutations_sync = 2",
        ],
    )
    code, report = verify(projector, "--all")
    assert code == 1, report
    assert [r["name"] for r in report["results"] if not r["equal"]] == ["order_summary"]
    (model,) = [r for r in report["results"] if r["name"] == "order_summary"]
    assert {(r["_side"], int(r["order_id"])) for r in model["read_model_rows"]} == {
        ("read model only", changed),
        ("definition only", changed),
    }, model

    write_clickhouse(
        projector,
        [
            # a row lost: gone from the replica, still in Postgres
            f"ALTER TABLE {orders} DELETE WHERE id = {gone} SETTINGS mutations_sync = 2",
            # a newer version that Postgres never had: a changed status
            f"INSERT INTO {orders} SELECT * REPLACE ('BOGUS' AS status, _version + 1 AS _version) "
            f"FROM {orders} FINAL WHERE id = {changed}",
            # a phantom key, with a version above every other
            f"INSERT INTO {orders} SELECT * REPLACE ({phantom} AS id, _version + 1 AS _version) "
            f"FROM (SELECT * FROM {orders} FINAL WHERE id = {changed})",
            # a column value changed in place, in a table with a composite key
            f"ALTER TABLE {items} UPDATE quantity = quantity + 1 WHERE order_id = {lines[-1][0]} "
            f"AND line_no = {lines[-1][1]} SETTINGS mutations_sync = 2",
        ],
    )
    code, report = verify(projector, "--all")
    assert code == 1, report
    assert drifting_keys(report, f"{schema}.orders") == {
        (str(gone), "postgres only", ()),
        (str(changed), "different", ("status",)),
        (str(phantom), "clickhouse only", ()),
    }
    assert drifting_keys(report, f"{schema}.order_items") == {
        (f"{lines[-1][0]},{lines[-1][1]}", "different", ("quantity",)),
    }
    assert drifting_keys(report, f"{schema}.customers") == set()

    # One name at a time, and a sample of 4 of its 16 ranges: what it finds is that drift.
    code, report = verify(projector, f"{schema}.order_items", "--sample", "4")
    (sampled,) = report["results"]
    assert sampled["name"] == f"{schema}.order_items" and sampled["ranges"] == "4 of 16", sampled
    assert code == (1 if sampled["drift"] else 0)
    assert drifting_keys(report, f"{schema}.order_items") <= {
        (f"{lines[-1][0]},{lines[-1][1]}", "different", ("quantity",)),
    }
    unknown = projector.cli("verify", f"{schema}.nope")
    assert unknown.returncode == 2 and "neither a replica table" in unknown.stderr, unknown.stderr


def test_verify_passes_while_a_writer_keeps_writing(
    stack: StackHandle, tmp_path: Path, clickhouse_server: str
) -> None:
    projector = ProjectorProcess(stack, tmp_path, server_url=clickhouse_server)
    schema = shop_projection(stack, projector)
    projector.env["PROJECTOR_TRANSACTION_METADATA"] = "true"  # the watermark verify waits for
    writer = ShopWriter(stack.admin_dsn, schema, seed=12)
    writer.run(rate_per_s=0, transactions=60)
    projector.catch_up()
    stop = threading.Event()
    writing = threading.Thread(target=writer.run, kwargs={"rate_per_s": 5, "stop": stop.is_set})
    running = projector.start()
    writing.start()
    try:
        before = writer.stats.transactions
        code, report = verify(projector, "--all")
        assert code == 0, json.dumps(report, indent=1)
        assert writer.stats.transactions > before, "the writer did not write meanwhile"
        assert {f"{schema}.orders", "order_summary"} <= {r["name"] for r in report["results"]}
    finally:
        stop.set()
        writing.join(60)
        running.send_signal(signal.SIGTERM)
        running.wait(60)


def test_verify_names_every_key_of_a_wide_drift(
    stack: StackHandle, tmp_path: Path, clickhouse_server: str
) -> None:
    """Every row of a 6,000-row table lost from its replica: verify names each key, after
    checking them again while a projector may run (server backend, step 5) -- more key text
    than one ClickHouse statement takes (max_query_size), so it goes in bounded statements."""
    projector = ProjectorProcess(stack, tmp_path, server_url=clickhouse_server)
    table = projector.table("vf_wide")
    stack.sql(f"CREATE TABLE {table} (id text PRIMARY KEY, n int)")
    stack.apply()
    stack.sql(
        f"INSERT INTO {table} SELECT 'key-' || lpad(i::text, 10, '0') || '-' || repeat('k', 40), "
        "i FROM generate_series(1, 6000) AS i"
    )
    projector.catch_up()
    code, report = verify(projector, f"public.{table}")
    assert code == 0, report
    write_clickhouse(
        projector,
        [
            f"ALTER TABLE {projector.replica_db}.{table} DELETE WHERE n % 1000 != 7 "
            "SETTINGS mutations_sync = 2",
        ],
    )
    code, report = verify(projector, f"public.{table}")
    assert code == 1, report
    lost = drifting_keys(report, f"public.{table}")
    expected = {
        (f"key-{i:010d}-{'k' * 40}", "postgres only", ()) for i in range(1, 6001) if i % 1000 != 7
    }
    assert lost == expected
