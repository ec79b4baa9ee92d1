"""A fresh deployment, as a new user meets it: a shop whose product and line tables are still empty.

Debezium creates a table's topic on its first change, so those two tables have no topic and no
schema; the projector creates their replicas from their definitions in Postgres
(projector/replicas/source_tables.py), and every read model over them exists from the start. An
order written without lines is then served at its LSN, and the first line written later reaches
the same read model.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from devstack.shop import create_shop
from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.test_query_service import serve_shop, write


def test_an_order_without_lines_is_served_at_its_lsn_on_a_fresh_shop(
    stack: StackHandle, tmp_path: Path
) -> None:
    workdir = tmp_path
    projector = ProjectorProcess(stack, workdir)
    s = f"fresh_{projector.unique}"
    create_shop(stack.admin_dsn, s)  # every table empty
    stack.apply(capture=f"public,{s}")
    (customer, order), lsn = write(
        stack,
        [
            (
                f"INSERT INTO {s}.customers (name, email) VALUES ('Grace', 'g@example.com') RETURNING id",
                [],
            ),
            (
                f"INSERT INTO {s}.orders (customer_id, created_at) VALUES (currval('{s}.customers_id_seq'), now()) RETURNING id",
                [],
            ),
        ],
    )
    service = serve_shop(projector, s)
    process = service.process
    try:
        # Before: order_summary needs order_items and products, which never changed: 202 for
        # as long as the client waits.
        answer = service.read_your_write("/queries/order_by_id", {"order_id": str(order)}, lsn)
        assert answer.status_code == 200, answer.text
        (row,) = answer.json()["rows"]
        assert (int(row["order_id"]), int(row["customer_id"]), row["customer_name"]) == (
            order,
            customer,
            "Grace",
        )
        assert (int(row["item_count"]), row["product_names"]) == (0, [])
        assert "created from its definition in Postgres" in projector.log.read_text()

        # The empty tables' replicas are empty, and hold the first rows written later: the
        # first product and line reach the read model at their LSN.
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute(f"INSERT INTO {s}.products (name, price) VALUES ('Lamp', 12.50)")
                conn.execute(
                    f"INSERT INTO {s}.order_items VALUES ({order}, 1, "
                    f"currval('{s}.products_id_seq'), 2, 12.50)"
                )
            (lsn_after,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
        answer = service.read_your_write(
            "/queries/order_by_id", {"order_id": str(order)}, str(lsn_after)
        )
        assert answer.status_code == 200, answer.text
        (row,) = answer.json()["rows"]
        assert (int(row["item_count"]), row["product_names"], float(row["total"])) == (
            1,
            ["Lamp"],
            25.0,
        )
    finally:
        process.terminate()
        assert process.wait(60) == 0, projector.log.read_text()[-3000:]
    products = projector.replica_db.replace("public", s) + ".products"
    replica = projector.sql(f"SELECT count() AS n FROM {products} FINAL")
    assert int(replica[0]["n"]) == 1
