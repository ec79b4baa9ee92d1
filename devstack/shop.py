"""The demo domain: a small shop whose application writes plain SQL and is never changed.

Tables (schema `shop` by default): `customers`, `products`, `orders` (status lifecycle PENDING →
CONFIRMED → SHIPPED → DELIVERED, or CANCELLED from PENDING/CONFIRMED) and `order_items`. All have
REPLICA IDENTITY FULL, so Debezium's update and delete events carry the complete before-image.

`ShopWriter` behaves like the application: new customers and products, orders with their items
in one transaction, status changes, price changes, customer renames, removed order lines,
cancellations and deletes of cancelled orders, at a configurable rate, with a fixed seed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

STATUSES = ("PENDING", "CONFIRMED", "SHIPPED", "DELIVERED", "CANCELLED")
NEXT_STATUS = {"PENDING": "CONFIRMED", "CONFIRMED": "SHIPPED", "SHIPPED": "DELIVERED"}

DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.customers (
    id bigserial PRIMARY KEY, name text NOT NULL, email text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {schema}.products (
    id bigserial PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE IF NOT EXISTS {schema}.orders (
    id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES {schema}.customers,
    status text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'CONFIRMED', 'SHIPPED', 'DELIVERED', 'CANCELLED')),
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {schema}.order_items (
    order_id bigint NOT NULL REFERENCES {schema}.orders ON DELETE CASCADE,
    line_no int NOT NULL, product_id bigint NOT NULL REFERENCES {schema}.products,
    quantity int NOT NULL CHECK (quantity > 0), unit_price numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, line_no));
ALTER TABLE {schema}.customers REPLICA IDENTITY FULL;
ALTER TABLE {schema}.products REPLICA IDENTITY FULL;
ALTER TABLE {schema}.orders REPLICA IDENTITY FULL;
ALTER TABLE {schema}.order_items REPLICA IDENTITY FULL;
"""


def create_shop(dsn: str, schema: str = "shop") -> None:
    """Create the shop's tables if they are missing (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in DDL.split(";"):
            if statement.strip():
                conn.execute(sql.SQL(statement.strip()).format(schema=sql.Identifier(schema)))


@dataclass
class WriterStats:
    transactions: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class ShopWriter:
    def __init__(self, dsn: str, schema: str = "shop", seed: int = 1) -> None:
        self.dsn = dsn
        self.schema = schema
        self.rng = random.Random(seed)
        self.stats = WriterStats()

    def _t(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))

    def run(
        self,
        rate_per_s: float = 20.0,
        duration_s: float | None = None,
        transactions: int | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> WriterStats:
        """Write until `duration_s`, `transactions` or `stop()`, about `rate_per_s` per second."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        pause = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        with psycopg.connect(self.dsn) as conn:
            self._seed_catalogue(conn)
            while not stop():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if transactions is not None and self.stats.transactions >= transactions:
                    break
                with conn.transaction():
                    self._one_transaction(conn)
                self.stats.transactions += 1
                if pause:
                    time.sleep(pause)
        return self.stats

    def _seed_catalogue(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            (customers,) = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(self._t("customers"))
            ).fetchone() or (0,)
            if customers == 0:
                for _ in range(5):
                    self._new_customer(conn)
                for _ in range(8):
                    self._new_product(conn)

    def _one_transaction(self, conn: psycopg.Connection) -> None:
        roll = self.rng.random()
        if roll < 0.35:
            self._new_order(conn)
        elif roll < 0.65:
            self._advance_order(conn)
        elif roll < 0.72:
            self._cancel_order(conn)
        elif roll < 0.78:
            self._rename_customer(conn)
        elif roll < 0.84:
            self._change_price(conn)
        elif roll < 0.90:
            self._remove_line(conn)
        elif roll < 0.94:
            self._delete_cancelled_order(conn)
        elif roll < 0.97:
            self._new_customer(conn)
        else:
            self._new_product(conn)

    def _pick(self, conn: psycopg.Connection, query: sql.Composed) -> int | None:
        row = conn.execute(query).fetchone()
        return None if row is None else int(row[0])

    def _new_customer(self, conn: psycopg.Connection) -> None:
        n = self.rng.randint(1, 10**6)
        conn.execute(
            sql.SQL("INSERT INTO {} (name, email) VALUES (%s, %s)").format(self._t("customers")),
            [f"Customer {n}", f"customer{n}@example.com"],
        )
        self.stats.count("new customer")

    def _new_product(self, conn: psycopg.Connection) -> None:
        conn.execute(
            sql.SQL("INSERT INTO {} (name, price) VALUES (%s, %s)").format(self._t("products")),
            [f"Product {self.rng.randint(1, 10**6)}", f"{self.rng.uniform(1, 200):.2f}"],
        )
        self.stats.count("new product")

    def _new_order(self, conn: psycopg.Connection) -> None:
        customer = self._pick(
            conn,
            sql.SQL("SELECT id FROM {} ORDER BY random() LIMIT 1").format(self._t("customers")),
        )
        if customer is None:
            return
        # Spread orders over a few days and months so the daily and monthly models have groups.
        days_ago = self.rng.choice([0, 0, 1, 2, 31, 45])
        (order_id,) = conn.execute(
            sql.SQL(
                "INSERT INTO {} (customer_id, created_at) VALUES (%s, now() - make_interval(days => %s)) RETURNING id"
            ).format(self._t("orders")),
            [customer, days_ago],
        ).fetchone() or (None,)
        for line in range(1, self.rng.randint(1, 4) + 1):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {items} (order_id, line_no, product_id, quantity, unit_price) "
                    "SELECT %s, %s, id, %s, price FROM {products} ORDER BY random() LIMIT 1"
                ).format(items=self._t("order_items"), products=self._t("products")),
                [order_id, line, self.rng.randint(1, 5)],
            )
        self.stats.count("new order")

    def _advance_order(self, conn: psycopg.Connection) -> None:
        status = self.rng.choice(list(NEXT_STATUS))
        updated = conn.execute(
            sql.SQL(
                "UPDATE {t} SET status = %s, updated_at = now() WHERE id = "
                "(SELECT id FROM {t} WHERE status = %s ORDER BY random() LIMIT 1)"
            ).format(t=self._t("orders")),
            [NEXT_STATUS[status], status],
        )
        if updated.rowcount:
            self.stats.count("status change")

    def _cancel_order(self, conn: psycopg.Connection) -> None:
        updated = conn.execute(
            sql.SQL(
                "UPDATE {t} SET status = 'CANCELLED', updated_at = now() WHERE id = "
                "(SELECT id FROM {t} WHERE status IN ('PENDING', 'CONFIRMED') ORDER BY random() LIMIT 1)"
            ).format(t=self._t("orders"))
        )
        if updated.rowcount:
            self.stats.count("cancellation")

    def _rename_customer(self, conn: psycopg.Connection) -> None:
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET name = name || ' Jr.' WHERE id = (SELECT id FROM {t} ORDER BY random() LIMIT 1)"
            ).format(t=self._t("customers"))
        )
        self.stats.count("customer rename")

    def _change_price(self, conn: psycopg.Connection) -> None:
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET price = round(price * %s, 2) WHERE id = (SELECT id FROM {t} ORDER BY random() LIMIT 1)"
            ).format(t=self._t("products")),
            [self.rng.choice(["0.9", "1.1", "1.25"])],
        )
        self.stats.count("price change")

    def _remove_line(self, conn: psycopg.Connection) -> None:
        deleted = conn.execute(
            sql.SQL(
                "DELETE FROM {i} WHERE (order_id, line_no) = (SELECT i.order_id, i.line_no FROM {i} i "
                "JOIN {o} o ON o.id = i.order_id WHERE o.status = 'PENDING' AND i.line_no > 1 "
                "ORDER BY random() LIMIT 1)"
            ).format(i=self._t("order_items"), o=self._t("orders"))
        )
        if deleted.rowcount:
            self.stats.count("removed line")

    def _delete_cancelled_order(self, conn: psycopg.Connection) -> None:
        deleted = conn.execute(
            sql.SQL(
                "DELETE FROM {t} WHERE id = (SELECT id FROM {t} WHERE status = 'CANCELLED' ORDER BY random() LIMIT 1)"
            ).format(t=self._t("orders"))
        )
        if deleted.rowcount:
            self.stats.count("deleted order")
