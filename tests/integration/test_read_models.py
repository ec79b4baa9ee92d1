"""Read models equal the same questions asked of Postgres, exactly, after a shop workload with
status changes, cancellations, deletes, price changes and customer renames, while the projector
is killed and restarted.

The Postgres queries (read_model_checks.py) are written independently of projector/read_models/read_models.toml: they state
what each read model means, so a wrong definition fails here as surely as a wrong projection.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from devstack.shop import ShopWriter, create_shop
from tests.integration.conftest import FENCE_TABLE, StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.read_model_checks import (
    assert_equal_to_postgres,
    assert_reconciled,
)


def transaction_ends(stack: StackHandle, schema: str) -> list[tuple[int, str, set[str]]]:
    """(offset, transaction id, tables) of every END on the transaction topic touching `schema`,
    read straight from Kafka."""
    topic, decoder, found = "cdc.transaction", stack.decoder(), []
    for msg in stack.messages_to_end(topic):
        offset = msg.offset() or 0
        value = decoder.decode(topic, 0, offset, msg.key(), msg.value()).value or {}
        tables = {c["data_collection"] for c in value.get("data_collections") or []}
        if value.get("status") == "END" and any(t.startswith(f"{schema}.") for t in tables):
            found.append((offset, value["id"].partition(":")[0], tables))  # the Postgres xid
    return found


def watermarks(projector: ProjectorProcess) -> dict[str, str | None]:
    result = projector.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # Table topics are applied to their end; the transaction topic keeps growing with the
    # heartbeats' transactions, so its lag is whatever arrived since.
    tables = [p for p in report["partitions"] if p["topic"] != "cdc.transaction"]
    assert tables and all(p["lag"] == 0 for p in tables), report["partitions"]
    models = report["read_models"]
    return {name: (m["watermark"] or {}).get("tx_id") for name, m in models.items()}


@one_backend("server")
def test_read_models_equal_postgres_after_a_shop_workload_with_crashes(
    stack: StackHandle, projector: ProjectorProcess, tmp_path: Path
) -> None:
    schema = f"shop_{projector.unique}"
    create_shop(stack.admin_dsn, schema)
    stack.apply(capture=f"public,{schema}")
    workload = {
        "PROJECTOR_SCHEMAS": f"public,{schema}",
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
        "PROJECTOR_TRANSACTION_METADATA": "true",
    }
    projector.env |= workload
    writer = ShopWriter(stack.admin_dsn, schema, seed=7)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (writer.run(rate_per_s=0, transactions=1500), done.set()), daemon=True
    )
    thread.start()
    for run in range(3):
        # Killed while it applies: once it holds its partitions (in the deployment's group, a
        # run after a kill would wait out the killed run's session and be killed idle).
        process, since = projector.start_in_a_group_of_its_own(run)
        projector.wait_until_assigned(process, since)
        time.sleep(2)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    thread.join(300)
    assert done.is_set(), "the shop writer did not finish"
    kinds = writer.stats.by_kind
    for kind in (
        "status change",
        "cancellation",
        "customer rename",
        "price change",
        "removed line",
        "deleted order",
    ):
        assert kinds.get(kind, 0) > 0, f"the workload never did a {kind}: {kinds}"

    projector.catch_up()
    assert_equal_to_postgres(stack, projector, schema)
    assert_reconciled(projector)

    # Every read model is complete up to the newest transaction on its tables.
    ends = transaction_ends(stack, schema)
    marks = watermarks(projector)
    for name, sources in SOURCES.items():
        newest = [tx for _, tx, tables in ends if tables & {f"{schema}.{t}" for t in sources}]
        assert marks[name] == newest[-1], (name, marks, newest[-3:])

    # A projector that does not apply order_items: models over orders alone stay complete, models
    # that need order_items stop before the first transaction that wrote it.
    # A deployment of its own (group, chDB directory or databases on the server).
    partial = ProjectorProcess(stack, tmp_path / "partial", server_url=projector.server_url)
    partial.env |= {
        **workload,
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders)",
    }
    (tmp_path / "partial").mkdir()
    partial.catch_up()
    partial_marks = watermarks(partial)
    assert partial_marks["orders_by_status"] == marks["orders_by_status"]
    first_with_items = next(off for off, _, tables in ends if f"{schema}.order_items" in tables)
    summary_tables = {f"{schema}.{t}" for t in SOURCES["order_summary"]}
    before = [tx for off, tx, tables in ends if off < first_with_items and tables & summary_tables]
    assert partial_marks["order_summary"] == (before[-1] if before else None), partial_marks


SOURCES = {
    "order_summary": ["orders", "customers", "order_items", "products"],
    "order_lines": ["order_items", "orders", "products"],
    "order_status": ["orders"],
    # an aggregate follows the sources of the entity that feeds it
    "daily_sales": ["orders", "customers", "order_items", "products"],
    "monthly_sales": ["orders", "customers", "order_items", "products"],
    "customer_lifetime_value": ["orders", "customers", "order_items", "products"],
    "product_popularity": ["order_items", "orders", "products"],
    "orders_by_status": ["orders"],
}
