"""Read models equal the same questions asked of Postgres, exactly, after a shop workload with
status changes, cancellations, deletes, price changes and customer renames, while the projector
is killed and restarted.

The Postgres queries below are written independently of queries/read_models.toml: they state
what each read model means, so a wrong definition fails here as surely as a wrong projection.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

from devstack.shop import ShopWriter, create_shop
from tests.integration.conftest import FENCE_TABLE, StackHandle
from tests.integration.projector_harness import ProjectorProcess

UTC_TEXT = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"

POSTGRES = {
    "order_summary": f"""
        SELECT o.id, o.customer_id, c.name, c.email, count(i.line_no),
               coalesce(sum(i.quantity), 0), coalesce(sum(i.quantity * i.unit_price), 0),
               o.status, {UTC_TEXT.format("o.created_at")}, {UTC_TEXT.format("o.updated_at")},
               coalesce(array_agg(p.name ORDER BY i.line_no) FILTER (WHERE i.line_no IS NOT NULL),
                        ARRAY[]::text[])
        FROM {{s}}.orders o LEFT JOIN {{s}}.customers c ON c.id = o.customer_id
        LEFT JOIN {{s}}.order_items i ON i.order_id = o.id
        LEFT JOIN {{s}}.products p ON p.id = i.product_id
        GROUP BY o.id, c.id ORDER BY o.id""",
    "order_lines": """
        SELECT i.order_id, i.line_no, i.product_id, p.name, i.quantity, i.unit_price, o.status
        FROM {s}.order_items i JOIN {s}.orders o ON o.id = i.order_id
        JOIN {s}.products p ON p.id = i.product_id ORDER BY i.order_id, i.line_no""",
    "daily_sales": """
        SELECT (o.created_at AT TIME ZONE 'UTC')::date::text AS day, count(DISTINCT o.id),
               sum(i.quantity * i.unit_price),
               trunc(sum(i.quantity * i.unit_price) / count(DISTINCT o.id), 2)
        FROM {s}.orders o JOIN {s}.order_items i ON i.order_id = o.id
        WHERE o.status <> 'CANCELLED' GROUP BY 1 ORDER BY 1""",
    "monthly_sales": """
        SELECT date_trunc('month', o.created_at AT TIME ZONE 'UTC')::date::text,
               count(DISTINCT o.id), sum(i.quantity * i.unit_price),
               trunc(sum(i.quantity * i.unit_price) / count(DISTINCT o.id), 2)
        FROM {s}.orders o JOIN {s}.order_items i ON i.order_id = o.id
        WHERE o.status <> 'CANCELLED' GROUP BY 1 ORDER BY 1""",
    "customer_lifetime_value": """
        SELECT c.id, c.name, count(DISTINCT o.id), sum(i.quantity * i.unit_price)
        FROM {s}.customers c JOIN {s}.orders o ON o.customer_id = c.id
        JOIN {s}.order_items i ON i.order_id = o.id
        WHERE o.status <> 'CANCELLED' GROUP BY c.id ORDER BY c.id""",
    "product_popularity": """
        SELECT p.id, p.name, sum(i.quantity), sum(i.quantity * i.unit_price)
        FROM {s}.products p JOIN {s}.order_items i ON i.product_id = p.id
        JOIN {s}.orders o ON o.id = i.order_id
        WHERE o.status <> 'CANCELLED' GROUP BY p.id ORDER BY p.id""",
    "order_status": "SELECT id, status FROM {s}.orders ORDER BY id",
    "orders_by_status": """
        SELECT status, count(*) FROM {s}.orders GROUP BY status ORDER BY status""",
}

CLICKHOUSE_ORDER = {
    "order_summary": "order_id",
    "order_lines": "order_id, line_no",
    "order_status": "order_id",
    "daily_sales": "day",
    "monthly_sales": "month",
    "customer_lifetime_value": "customer_id",
    "product_popularity": "product_id",
    "orders_by_status": "status",
}


def comparable(value: object) -> object:
    """Numbers compare as decimals (ClickHouse's JSON quotes 64-bit ints and decimals)."""
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value)
        except ArithmeticError:
            return value
    return value


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
    for _ in range(3):
        process = projector.start()
        time.sleep(4)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    thread.join(300)
    assert done.is_set(), "the shop writer did not finish"
    kinds = writer.stats.by_kind
    for kind in ("status change", "cancellation", "customer rename", "price change",
                 "removed line", "deleted order"):  # fmt: skip
        assert kinds.get(kind, 0) > 0, f"the workload never did a {kind}: {kinds}"

    projector.catch_up()
    for name, query in POSTGRES.items():
        expected = [tuple(comparable(v) for v in row) for row in stack.sql(query.format(s=schema))]
        rows = projector.sql(
            f"SELECT * FROM {projector.read_model_db}.{name} ORDER BY {CLICKHOUSE_ORDER[name]}"
        )
        actual = [tuple(comparable(v) for v in row.values()) for row in rows]
        assert expected, f"{name}: Postgres has no rows, the comparison would be empty"
        assert actual == expected, f"{name} differs from Postgres:\n{actual[:5]}\n{expected[:5]}"

    # Each materialized model equals its own definition evaluated over the replicas.
    reconcile = projector.cli("read-models", "reconcile")
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    report = reconcile.stdout + reconcile.stderr
    assert report.count("equal") == len(POSTGRES), report

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
    partial.env |= {**workload,
                    "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders)"}  # fmt: skip
    (tmp_path / "partial").mkdir()
    partial.catch_up()
    partial_marks = watermarks(partial)
    assert partial_marks["orders_by_status"] == marks["orders_by_status"]
    first_with_items = next(off for off, _, tables in ends if f"{schema}.order_items" in tables)
    summary_tables = {f"{schema}.{t}" for t in SOURCES["order_summary"]}
    before = [tx for off, tx, tables in ends
              if off < first_with_items and tables & summary_tables]  # fmt: skip
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
