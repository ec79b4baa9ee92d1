"""Read models stay exact under every kind of change, on every side of their joins, while the
projector is killed at random: rounds of a random workload, each compared with Postgres (and each
model with its own definition over the replicas) after the round.

The changes: orders placed, lines added, changed and deleted, statuses moved to CANCELLED and
back, orders moved to another day or month and to another customer, customers and products
renamed, prices changed, orders deleted, and in the last round a TRUNCATE of the orders (with
their lines) followed by new orders.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from devstack.shop import ShopWriter
from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.read_model_checks import (
    assert_equal_to_postgres,
    assert_reconciled,
    shop_projection,
)

STATUSES = ["PENDING", "CONFIRMED", "SHIPPED", "DELIVERED", "CANCELLED"]


class RandomChanges:
    """One random change per call, each of a kind the read models must follow."""

    def __init__(self, conn: psycopg.Connection, schema: str, seed: int) -> None:
        self.conn, self.schema = conn, schema
        self.rng = random.Random(seed)
        self.writer = ShopWriter("", schema, seed=seed)
        self.done: Counter[str] = Counter()

    def t(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))

    def run(self, sql_text: str, *tables: str, params: list[object] | None = None) -> int:
        names = {f"t{i}": self.t(table) for i, table in enumerate(tables)}
        return self.conn.execute(sql.SQL(sql_text).format(**names), params or []).rowcount

    def back_from_cancelled(self) -> int:
        """A cancelled order back to PENDING; with none cancelled, one is cancelled now (not
        counted) for the next draw of this change: it happens whatever the random statuses."""
        back = self.run(
            "UPDATE {t0} SET status = 'PENDING' WHERE id = "
            "(SELECT id FROM {t0} WHERE status = 'CANCELLED' ORDER BY random() LIMIT 1)",
            "orders",
        )
        if not back:
            self.run(
                "UPDATE {t0} SET status = 'CANCELLED' WHERE id = "
                "(SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "orders",
            )
        return back

    def one(self) -> None:
        kinds: dict[str, Callable[[], int]] = {
            "new order": lambda: (self.writer._new_order(self.conn), 1)[1],
            "new customer": lambda: (self.writer._new_customer(self.conn), 1)[1],
            "new product": lambda: (self.writer._new_product(self.conn), 1)[1],
            "added line": lambda: self.run(
                "INSERT INTO {t0} (order_id, line_no, product_id, quantity, unit_price) "
                "SELECT o.id, coalesce((SELECT max(line_no) FROM {t0} WHERE order_id = o.id), 0) + 1,"
                " p.id, 2, p.price FROM (SELECT id FROM {t1} ORDER BY random() LIMIT 1) o, "
                "(SELECT id, price FROM {t2} ORDER BY random() LIMIT 1) p",
                "order_items",
                "orders",
                "products",
            ),
            "changed quantity": lambda: self.run(
                "UPDATE {t0} SET quantity = quantity + 1 WHERE (order_id, line_no) = "
                "(SELECT order_id, line_no FROM {t0} ORDER BY random() LIMIT 1)",
                "order_items",
            ),
            "deleted line": lambda: self.run(
                "DELETE FROM {t0} WHERE (order_id, line_no) = "
                "(SELECT order_id, line_no FROM {t0} ORDER BY random() LIMIT 1)",
                "order_items",
            ),
            "status change": lambda: self.run(
                "UPDATE {t0} SET status = %s, updated_at = now() WHERE id = "
                "(SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "orders",
                params=[self.rng.choice(STATUSES)],
            ),
            "back from cancelled": self.back_from_cancelled,
            "moved day or month": lambda: self.run(
                "UPDATE {t0} SET created_at = created_at + make_interval(days => %s) WHERE id = "
                "(SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "orders",
                params=[self.rng.choice([-40, -1, 1, 33])],
            ),
            "moved customer": lambda: self.run(
                "UPDATE {t0} SET customer_id = (SELECT id FROM {t1} ORDER BY random() LIMIT 1) "
                "WHERE id = (SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "orders",
                "customers",
            ),
            "renamed customer": lambda: self.run(
                "UPDATE {t0} SET name = name || '*' WHERE id = "
                "(SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "customers",
            ),
            "renamed product": lambda: self.run(
                "UPDATE {t0} SET name = name || '+' WHERE id = "
                "(SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "products",
            ),
            "price change": lambda: self.run(
                "UPDATE {t0} SET price = price + 1 WHERE id = "
                "(SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "products",
            ),
            "deleted order": lambda: self.run(
                "DELETE FROM {t0} WHERE id = (SELECT id FROM {t0} ORDER BY random() LIMIT 1)",
                "orders",
            ),
        }
        weights = {"new order": 6, "new customer": 1, "new product": 1}
        kind = self.rng.choices(list(kinds), [weights.get(k, 2) for k in kinds])[0]
        with self.conn.transaction():
            if kinds[kind]():
                self.done[kind] += 1


# Rounds of 150 random changes with three kills each, every round checked against Postgres.
ROUNDS = 2


def test_read_models_stay_exact_under_every_change_with_kills(
    stack: StackHandle, tmp_path: Path
) -> None:
    # On the embedded engine only: the server backend runs the very same SQL, and the read-model
    # tests of test_read_models.py and test_read_model_versions.py run on both.
    projector = ProjectorProcess(stack, tmp_path)
    schema = shop_projection(stack, projector)
    projector.env |= {
        "PROJECTOR_MAX_BATCH_MESSAGES": "40",  # many batches: many instants to be killed in
    }
    kill_rng = random.Random(5)
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        changes = RandomChanges(conn, schema, seed=17)
        changes.writer._seed_catalogue(conn)
        for _ in range(20):
            changes.writer._new_order(conn)
        # Each run in a consumer group of its own: in the deployment's group, a run after a kill
        # waits out the killed run's session (6 s) and would be killed before it applied a thing.
        runs = itertools.count()
        for round_no in range(ROUNDS):
            process, _ = projector.start_in_a_group_of_its_own(next(runs))
            for step in range(150):
                changes.one()
                if step % 50 == 49:  # a kill somewhere inside the round, then a restart
                    time.sleep(kill_rng.uniform(0.5, 3))
                    process.send_signal(signal.SIGKILL)
                    process.wait(30)
                    process, _ = projector.start_in_a_group_of_its_own(next(runs))
            if round_no == ROUNDS - 1:  # the last round ends with a TRUNCATE (cascading)
                conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(changes.t("orders")))
                for _ in range(10):
                    changes.writer._new_order(conn)
            time.sleep(kill_rng.uniform(0.5, 2))
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            projector.catch_up()
            assert_equal_to_postgres(stack, projector, schema)
            assert_reconciled(projector)
    kinds = {k for k, n in changes.done.items() if n}
    missing = {
        "added line",
        "changed quantity",
        "deleted line",
        "back from cancelled",
        "moved day or month",
        "moved customer",
        "renamed customer",
        "renamed product",
        "deleted order",
    } - kinds
    assert not missing, f"the workload never made these changes: {missing}"
