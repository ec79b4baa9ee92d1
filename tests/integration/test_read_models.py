"""Read models equal the same questions asked of Postgres, exactly, after a shop workload with
status changes, cancellations, deletes, price changes and customer renames, while the projector
is killed and restarted.

The Postgres queries below are written independently of queries/read_models.toml: they state
what each read model means, so a wrong definition fails here as surely as a wrong projection.
"""

from __future__ import annotations

import signal
import threading
import time
from decimal import Decimal

from projector.shop import ShopWriter, create_shop
from tests.integration.conftest import FENCE_TABLE, StackHandle
from tests.integration.projector_harness import ProjectorProcess

UTC_TEXT = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"

POSTGRES = {
    "order_summary": f"""
        SELECT o.id, o.customer_id, c.name, c.email, count(i.line_no),
               coalesce(sum(i.quantity), 0), coalesce(sum(i.quantity * i.unit_price), 0),
               o.status, {UTC_TEXT.format("o.created_at")}, {UTC_TEXT.format("o.updated_at")}
        FROM {{s}}.orders o LEFT JOIN {{s}}.customers c ON c.id = o.customer_id
        LEFT JOIN {{s}}.order_items i ON i.order_id = o.id
        GROUP BY o.id, c.id ORDER BY o.id""",
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
    "orders_by_status": """
        SELECT status, count(*) FROM {s}.orders GROUP BY status ORDER BY status""",
}

CLICKHOUSE_ORDER = {
    "order_summary": "order_id",
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


def test_read_models_equal_postgres_after_a_shop_workload_with_crashes(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    schema = f"shop_{projector.unique}"
    create_shop(stack.admin_dsn, schema)
    stack.apply(capture=f"public,{schema}")
    projector.env |= {
        "PROJECTOR_SCHEMAS": f"public,{schema}",
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
    }
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
        rows = projector.sql(f"SELECT * FROM read_models.{name} ORDER BY {CLICKHOUSE_ORDER[name]}")
        actual = [tuple(comparable(v) for v in row.values()) for row in rows]
        assert expected, f"{name}: Postgres has no rows, the comparison would be empty"
        assert actual == expected, f"{name} differs from Postgres:\n{actual[:5]}\n{expected[:5]}"
