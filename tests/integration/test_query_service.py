"""The query service on the real stack, as `projector run --serve` hosts it on chDB: a writer's
row read back through the API with its LSN, the cache across watermark changes, ad-hoc SQL that
cannot write, auth, and `projector query` / `projector sql` on the same paths."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from devstack.shop import ShopWriter, create_shop
from tests.integration.conftest import FENCE_TABLE, PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess, free_port

TOKEN = "integration-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Service:
    url: str
    schema: str
    projector: ProjectorProcess
    process: subprocess.Popen[bytes]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=60, **kwargs)

    def read_your_write(self, path: str, params: dict[str, str], lsn: str) -> httpx.Response:
        """GET with min_lsn, following 202s as a client would (Retry-After) for up to 90 s."""
        deadline = time.monotonic() + 90
        while True:
            answer = self.get(path, params={**params, "min_lsn": lsn})
            if answer.status_code != 202:
                return answer
            assert time.monotonic() < deadline, f"still 202 after 90 s: {answer.text}"
            time.sleep(float(answer.headers["retry-after"]))


def write(stack: StackHandle, statements: list[tuple[str, list[Any]]]) -> tuple[list[Any], str]:
    """Run `statements` in one transaction; the first column of each RETURNING, and the LSN
    the writer reads after its commit (the read-your-writes recipe of the README)."""
    results = []
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        with conn.transaction():
            for sql, params in statements:
                cur = conn.execute(sql, params)
                results.append(cur.fetchone()[0] if cur.description else None)  # type: ignore[index]
        (lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
    return results, str(lsn)


def serve_shop(projector: ProjectorProcess, schema: str, ready: str = "/health") -> Service:
    """`projector run --serve` over the shop in `schema` (its read models, a token), once `ready`
    answers 200 (the default: up; a query: its read models created too)."""
    port = free_port()
    projector.env |= {
        "PROJECTOR_SCHEMAS": f"public,{schema}",
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_API_TOKEN": TOKEN,
        "PROJECTOR_QUERY_PORT": "9",  # the flag below wins over the setting
        "PROJECTOR_OPS_SAMPLE_S": "0.5",
    }
    with projector.log.open("ab") as out:
        process = subprocess.Popen(
            [PROJECTOR, "run", "--serve", "--host", "127.0.0.1", "--port", str(port)],
            env=projector.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Service(f"http://127.0.0.1:{port}", schema, projector, process)
    deadline = time.monotonic() + 120
    while True:
        try:
            if running.get(ready).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        assert process.poll() is None, projector.log.read_text()[-3000:]
        assert time.monotonic() < deadline, projector.log.read_text()[-3000:]
        time.sleep(1)


@pytest.fixture(scope="module")
def service(stack: StackHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("query-service")
    projector = ProjectorProcess(stack, workdir)
    schema = f"shop_{projector.unique}"
    create_shop(stack.admin_dsn, schema)
    stack.apply(capture=f"public,{schema}")
    ShopWriter(stack.admin_dsn, schema, seed=11).run(rate_per_s=0, transactions=200)
    running = serve_shop(projector, schema, ready="/queries/order_counts_by_status")
    yield running
    process = running.process
    process.terminate()
    assert process.wait(60) == 0, projector.log.read_text()[-3000:]


def test_a_written_row_is_read_back_with_its_lsn(service: Service, stack: StackHandle) -> None:
    s = service.schema
    (customer, order, *_), lsn = write(
        stack,
        [
            (
                f"INSERT INTO {s}.customers (name, email) VALUES ('Ada', 'ada@example.com') RETURNING id",
                [],
            ),
            (
                f"INSERT INTO {s}.orders (customer_id, created_at) VALUES (currval('{s}.customers_id_seq'), now()) RETURNING id",
                [],
            ),
            # three lines in the order's transaction: read at its LSN, never one or two of them
            *(
                (
                    f"INSERT INTO {s}.order_items VALUES (currval('{s}.orders_id_seq'), {n}, (SELECT min(id) FROM {s}.products), 1, 19.99)",
                    [],
                )
                for n in (1, 2, 3)
            ),
        ],
    )
    answer = service.read_your_write("/queries/order_by_id", {"order_id": str(order)}, lsn)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["rows"]) == 1, body
    row = body["rows"][0]
    assert (int(row["order_id"]), int(row["customer_id"]), row["customer_name"]) == (
        order,
        customer,
        "Ada",
    )
    assert Decimal(str(row["total"])) == Decimal("59.97")
    assert (int(row["item_count"]), len(row["product_names"])) == (3, 3), row
    reached = body["watermark"]["lsn"]
    assert answer.headers["x-watermark-lsn"] == reached
    assert _lsn(reached) >= _lsn(lsn), (reached, lsn)


def test_behind_the_writer_answers_202_then_the_row(service: Service, stack: StackHandle) -> None:
    far = "FFFF/0"  # an LSN this Postgres has not reached: the read model cannot have either
    answer = service.get(
        "/queries/order_counts_by_status", params={"min_lsn": far, "wait_ms": "200"}
    )
    assert answer.status_code == 202
    assert answer.json()["status"] == "processing"
    assert int(answer.headers["retry-after"]) >= 1
    assert _lsn(answer.headers["x-watermark-lsn"]) > 0


def test_the_cache_never_serves_an_answer_older_than_asked(
    service: Service, stack: StackHandle
) -> None:
    s = service.schema
    (order,), _ = write(stack, [(f"SELECT max(id) FROM {s}.orders WHERE status = 'PENDING'", [])])
    params = {"status": "CONFIRMED", "limit": "10000"}
    first = service.get("/queries/orders_in_status", params=params)
    again = service.get("/queries/orders_in_status", params=params)
    if again.json()["watermark"]["lsn"] == first.json()["watermark"]["lsn"]:
        assert again.headers["x-cache"] == "hit"
        assert again.json()["rows"] == first.json()["rows"]
    ids = {int(r["order_id"]) for r in first.json()["rows"]}
    assert order not in ids
    _, lsn = write(
        stack,
        [
            (
                f"UPDATE {s}.orders SET status = 'CONFIRMED', updated_at = now() WHERE id = %s",
                [order],
            )
        ],
    )
    after = service.read_your_write("/queries/orders_in_status", params, lsn)
    assert after.status_code == 200
    assert after.headers["x-cache"] == "miss"
    assert order in {int(r["order_id"]) for r in after.json()["rows"]}
    metrics = service.get("/metrics").text
    assert 'query_cache_total{result="miss"}' in metrics


def test_named_queries_answer_what_postgres_answers(service: Service, stack: StackHandle) -> None:
    s = service.schema
    _, lsn = write(stack, [("SELECT 1", [])])
    ((customer,),) = stack.sql(
        f"SELECT customer_id FROM {s}.orders GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
    )
    expected = [
        r[0]
        for r in stack.sql(
            f"SELECT id FROM {s}.orders WHERE customer_id = %s ORDER BY created_at DESC, id DESC",
            [customer],
        )
    ]
    answer = service.read_your_write(
        "/queries/orders_of_customer", {"customer_id": str(customer)}, lsn
    )
    assert [int(r["order_id"]) for r in answer.json()["rows"]] == expected
    page = service.get(
        "/queries/orders_of_customer",
        params={"customer_id": str(customer), "limit": "1", "offset": "1"},
    )
    assert [int(r["order_id"]) for r in page.json()["rows"]] == expected[1:2]
    csv_answer = service.get("/queries/order_counts_by_status", headers={"Accept": "text/csv"})
    assert csv_answer.text.splitlines()[0] == "status,orders"


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE read_models.order_summary",
        "SELECT 1; DROP TABLE read_models.order_summary",
        "SELECT 1 -- comment\n; DROP TABLE read_models.order_summary",
        "INSERT INTO projector.dlq SELECT * FROM projector.dlq",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT * FROM (SELECT 1) SETTINGS readonly = 0",
        "CREATE TABLE x (a Int8) ENGINE = Memory",
        "SELECT * FROM system.numbers",
        "",
    ],
)
def test_ad_hoc_sql_cannot_write_or_escape(service: Service, statement: str) -> None:
    answer = httpx.post(service.url + "/sql", json={"sql": statement}, headers=AUTH, timeout=60)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["message"]
    still = service.get("/queries/order_counts_by_status")
    assert still.status_code == 200, "the read model is still there"


def test_ad_hoc_select_answers_with_rows(service: Service) -> None:
    answer = httpx.post(
        service.url + "/sql",
        json={
            "sql": "SELECT status, orders FROM read_models.orders_by_status ORDER BY status -- x"
        },
        headers=AUTH,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["rows"] and "lsn" in answer.json()["watermark"]


def test_every_endpoint_but_health_needs_the_token(service: Service) -> None:
    assert httpx.get(service.url + "/health").status_code == 200
    for path in ("/queries", "/queries/order_counts_by_status", "/metrics", "/ops/status"):
        assert httpx.get(service.url + path).status_code == 401
        assert (
            httpx.get(service.url + path, headers={"Authorization": "Bearer no"}).status_code == 401
        )
    assert httpx.post(service.url + "/sql", json={"sql": "SELECT 1"}).status_code == 401


def test_projector_query_asks_the_running_service(service: Service, stack: StackHandle) -> None:
    (order,), lsn = write(stack, [(f"SELECT max(id) FROM {service.schema}.orders", [])])
    result = service.projector.cli(
        "query",
        "order_by_id",
        "--param",
        f"order_id={order}",
        "--format",
        "json",
        "--min-lsn",
        lsn,
        env={"PROJECTOR_API_URL": service.url},
    )
    assert result.returncode == 0, result.stderr
    assert f'"order_id": {order}' in result.stdout
    refused = service.projector.cli(
        "query", "order_by_id", "--param", "order_id=x", env={"PROJECTOR_API_URL": service.url}
    )
    assert refused.returncode == 2 and "order_id" in refused.stderr


def test_projector_sql_refuses_a_second_statement(stack: StackHandle, tmp_path: Path) -> None:
    """`projector sql` appended `SETTINGS readonly = 1` to the text: a statement ending in a
    `--` comment swallowed it, and chDB ran the DROP. Now it takes the checks of POST /sql."""
    projector = ProjectorProcess(stack, tmp_path)
    projector.catch_up()
    table = f"{projector.replica_db}.{FENCE_TABLE}"
    for attack in (f"DROP TABLE {table} --", f"SELECT 1 AS x; DROP TABLE {table}"):
        result = projector.cli("sql", attack)
        exists = projector.sql(
            f"SELECT count() AS n FROM system.tables WHERE database = '{projector.replica_db}' "
            f"AND name = '{FENCE_TABLE}'"
        )
        assert int(exists[0]["n"]) == 1, f"{attack!r} dropped the table"
        assert result.returncode == 2, (attack, result.stdout, result.stderr)
        assert "error:" in result.stderr


def _lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)
