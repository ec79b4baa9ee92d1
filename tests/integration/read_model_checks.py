"""What a read model must equal, stated independently of projector/read_models/read_models.toml: the same
questions asked of Postgres. Shared by the read-model tests."""

from __future__ import annotations

from decimal import Decimal

from devstack.shop import create_shop
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
    "daily_order_statistics": """
        SELECT (o.created_at AT TIME ZONE 'UTC')::date::text, count(*),
               count(*) FILTER (WHERE o.status = 'CANCELLED'),
               coalesce(sum(i.units) FILTER (WHERE o.status <> 'CANCELLED'), 0),
               coalesce(sum(i.revenue) FILTER (WHERE o.status <> 'CANCELLED'), 0)
        FROM {s}.orders o LEFT JOIN (
            SELECT order_id, sum(quantity) AS units, sum(quantity * unit_price) AS revenue
            FROM {s}.order_items GROUP BY order_id) i ON i.order_id = o.id
        GROUP BY 1 ORDER BY 1""",
    "order_status": "SELECT id, status FROM {s}.orders ORDER BY id",
    "orders_by_status": """
        SELECT status, count(*) FROM {s}.orders GROUP BY status ORDER BY status""",
}

# An index holds its model's rows, sorted otherwise: the same question of Postgres.
POSTGRES |= {
    "order_summary_by_customer": POSTGRES["order_summary"],
    "order_summary_by_status": POSTGRES["order_summary"],
    "customer_ranking": POSTGRES["customer_lifetime_value"],
    "product_ranking": POSTGRES["product_popularity"],
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
    "daily_order_statistics": "day",
    "order_summary_by_customer": "order_id",
    "order_summary_by_status": "order_id",
    "customer_ranking": "customer_id",
    "product_ranking": "product_id",
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


def assert_equal_to_postgres(
    stack: StackHandle, projector: ProjectorProcess, schema: str, skip: frozenset[str] = frozenset()
) -> None:
    """Every read model (but `skip`), row by row and column by column, equals its Postgres query."""
    for name, query in POSTGRES.items():
        if name in skip:
            continue
        expected = [tuple(comparable(v) for v in row) for row in stack.sql(query.format(s=schema))]
        rows = projector.sql(
            f"SELECT * FROM {projector.read_model_db}.{name} ORDER BY {CLICKHOUSE_ORDER[name]}"
        )
        actual = [tuple(comparable(v) for v in row.values()) for row in rows]
        assert expected, f"{name}: Postgres has no rows, the comparison would be empty"
        if actual != expected:
            missing = [r for r in expected if r not in actual][:3]
            extra = [r for r in actual if r not in expected][:3]
            raise AssertionError(
                f"{name} differs from Postgres: only in Postgres {missing}, "
                f"only in ClickHouse {extra}"
            )


def assert_reconciled(projector: ProjectorProcess) -> None:
    """Each materialized model equals its own definition evaluated over the replicas."""
    reconcile = projector.cli("read-models", "reconcile")
    report = reconcile.stdout + reconcile.stderr
    assert reconcile.returncode == 0, report
    assert report.count("equal") == len(POSTGRES), report


def shop_projection(stack: StackHandle, projector: ProjectorProcess) -> str:
    """A shop schema of this test's own, captured, and `projector` set to project it (its
    read models included); returns the schema."""
    schema = f"shop_{projector.unique}"
    create_shop(stack.admin_dsn, schema)
    stack.apply(capture=f"public,{schema}")
    projector.env |= {
        "PROJECTOR_SCHEMAS": f"public,{schema}",
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
    }
    return schema
