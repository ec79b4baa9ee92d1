"""The write side of `projector read-model-bench`: the projector applying a bulk workload with
the read models kept and without (maintenance on/off), and read-model freshness (a Postgres
commit until it is visible in `daily_sales`) at a paced write rate."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from devstack.query_bench import Latency, quantiles

REPLICA, READ_MODELS, CONTROL = "replica_shop", "read_models", "projector"


BULK_WORKLOAD = """
INSERT INTO {s}.customers (name, email)
  SELECT 'Customer ' || n, 'c' || n || '@example.com' FROM generate_series(1, {customers}) n;
INSERT INTO {s}.products (name, price)
  SELECT 'Product ' || n, 1 + (n % 500) FROM generate_series(1, {products}) n;
INSERT INTO {s}.orders (customer_id, status, created_at)
  SELECT 1 + (n * 7919) % {customers}, 'PENDING', now() - make_interval(days => n % 400)
  FROM generate_series(1, {orders}) n;
INSERT INTO {s}.order_items (order_id, line_no, product_id, quantity, unit_price)
  SELECT o.id, l, 1 + (o.id * 31 + l) % {products}, 1 + l, 9.99
  FROM {s}.orders o, generate_series(1, 3) l;
UPDATE {s}.orders SET status = 'CONFIRMED', updated_at = now() WHERE id % 4 = 0;
UPDATE {s}.orders SET status = 'CANCELLED', updated_at = now() WHERE id % 25 = 0;
UPDATE {s}.customers SET name = name || ' Jr.' WHERE id % 50 = 0;
UPDATE {s}.products SET name = name || ' v2', price = price + 1 WHERE id % 20 = 0;
DELETE FROM {s}.order_items WHERE line_no = 3 AND order_id % 10 = 0
"""


def bulk_events(orders: int) -> dict[str, int]:
    customers, products = max(100, orders // 10), max(50, orders // 100)
    return {"customers": customers, "products": products, "orders": orders}


def run_write_side(events: int, log: Any) -> dict[str, float]:
    """events/s of `projector run --until-kafka-end` over the same shop topics, read-model
    maintenance on and off."""
    from devstack import Stack
    from devstack.capture import create_and_capture
    from devstack.shop import DDL as SHOP_DDL
    from projector.config import client_environment

    Stack().up(log=log)
    env = client_environment()
    schema = f"rmbench{uuid.uuid4().hex[:6]}"
    # ~4.6 events per order: the order, 3 lines, a share of updates, renames and deletes
    sizes = bulk_events(max(1000, int(events / 4.6)))
    create_and_capture(env, SHOP_DDL.format(schema=schema), schema)
    log(f"writing the bulk shop workload into Postgres schema {schema} ({sizes}) ...")
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        for statement in BULK_WORKLOAD.format(s=schema, **sizes).split(";"):
            if statement.strip():
                conn.execute(statement)
        (lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("",)
    projector = str(Path(sys.executable).parent / "projector")
    work = Path(tempfile.mkdtemp(prefix="projector-rm-write-"))
    rates: dict[str, float] = {}
    try:
        # Wait until Debezium has streamed everything: one throw-away run to the commit LSN.
        base = {
            **env,
            "PROJECTOR_SCHEMAS": schema,
            "PROJECTOR_TABLE_PATTERN": "(customers|products|orders|order_items)",
            "PROJECTOR_READ_MODEL_SCHEMA": schema,
            "PROJECTOR_METRICS_PORT": "0",
            "PROJECTOR_MAX_BATCH_MESSAGES": "50000",
            "PROJECTOR_TRANSACTION_METADATA": "false",
        }
        log("waiting for Debezium to stream the workload (a first run to the commit's LSN) ...")
        warm = {
            **base,
            "PROJECTOR_CHDB_PATH": str(work / "warm"),
            "PROJECTOR_GROUP_ID": f"{schema}-warm",
            "PROJECTOR_MAINTAIN_READ_MODELS": "false",
            "PROJECTOR_TRANSACTION_METADATA": "true",
        }
        subprocess.run(
            [projector, "run", "--until-lsn", lsn],
            env=warm,
            check=True,
            capture_output=True,
            timeout=3600,
        )
        applied = _applied_events(projector, warm)
        for label, maintain in (("off", False), ("on", True)):
            log(f"projecting {applied:,} events with read-model maintenance {label} ...")
            run_env = {
                **base,
                "PROJECTOR_CHDB_PATH": str(work / label),
                "PROJECTOR_GROUP_ID": f"{schema}-{label}",
                "PROJECTOR_MAINTAIN_READ_MODELS": str(maintain).lower(),
            }
            started = time.perf_counter()
            subprocess.run(
                [projector, "run", "--until-kafka-end"],
                env=run_env,
                check=True,
                capture_output=True,
                timeout=3600,
            )
            rates[label] = applied / (time.perf_counter() - started)
        rates["events"] = applied
        return rates
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _applied_events(projector: str, env: dict[str, str]) -> int:
    total = 0
    for table in ("customers", "products", "orders", "order_items"):
        done = subprocess.run(
            [
                projector,
                "sql",
                "--format",
                "csv",
                f"SELECT count() FROM replica_{env['PROJECTOR_SCHEMAS']}.{table}",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        total += int(done.stdout.strip().splitlines()[-1])
    return total


def run_freshness(rate: int, duration_s: float, probe_every_s: float, log: Any) -> Latency:
    from devstack.capture import create_and_capture
    from devstack.shop import DDL as SHOP_DDL
    from projector.config import client_environment

    env = client_environment()
    schema = f"rmfresh{uuid.uuid4().hex[:6]}"
    create_and_capture(env, SHOP_DDL.format(schema=schema), schema)
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        conn.execute(f"INSERT INTO {schema}.customers (name, email) VALUES ('c', 'c@x')")
        conn.execute(f"INSERT INTO {schema}.products (name, price) VALUES ('p', 1)")
        # every source has rows, so every replica table (and the read models over them) exists
        _probe(conn, schema, date(2119, 12, 31))
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="projector-rm-fresh-"))
    run_env = {
        **env,
        "PROJECTOR_SCHEMAS": schema,
        "PROJECTOR_CHDB_PATH": str(work / "chdb"),
        "PROJECTOR_TABLE_PATTERN": "(customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
        "PROJECTOR_GROUP_ID": f"{schema}-fresh",
        "PROJECTOR_METRICS_PORT": "0",
        "PROJECTOR_API_TOKEN": "bench",
        "PROJECTOR_QUERY_PORT": str(port),
        "PROJECTOR_QUERY_CACHE_ENTRIES": "0",
        "PROJECTOR_TRANSACTION_METADATA": "false",
    }
    projector = str(Path(sys.executable).parent / "projector")
    log_file = work / "projector.log"
    with log_file.open("ab") as out:
        process = subprocess.Popen(
            [projector, "run", "--serve"], env=run_env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/sql"
    headers = {"Authorization": "Bearer bench"}
    samples: list[float] = []
    stop = threading.Event()
    try:
        with httpx.Client(headers=headers, timeout=30) as http:
            _wait_serving(http, url, process, log_file)
            writer = threading.Thread(
                target=_paced_orders, args=(env["ADMIN_DSN"], schema, rate, stop), daemon=True
            )
            writer.start()
            log(f"freshness at {rate} orders/s for {duration_s:.0f}s ...")
            # days of their own, inside ClickHouse Date's range (up to 2149)
            day, deadline = date(2120, 1, 1), time.monotonic() + duration_s
            with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
                while time.monotonic() < deadline:
                    day += timedelta(days=1)
                    committed = _probe(conn, schema, day)
                    query = f"SELECT count() AS n FROM read_models.daily_sales WHERE day = '{day}'"
                    while time.time() - committed < 30:
                        answer = http.post(url, json={"sql": query, "format": "csv"})
                        if answer.status_code == 200 and answer.text.split()[-1:] == ["1"]:
                            samples.append(time.time() - committed)
                            break
                        time.sleep(0.01)
                    time.sleep(probe_every_s)
    finally:
        stop.set()
        process.terminate()
        process.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    if not samples:
        raise RuntimeError("no probe order became visible in daily_sales")
    return quantiles(samples)


def _probe(conn: psycopg.Connection, schema: str, day: date) -> float:
    with conn.transaction():
        (order,) = conn.execute(
            f"INSERT INTO {schema}.orders (customer_id, created_at) SELECT min(id), %s "
            f"FROM {schema}.customers RETURNING id",
            [datetime(day.year, day.month, day.day, 12, tzinfo=UTC)],
        ).fetchone() or (0,)
        conn.execute(
            f"INSERT INTO {schema}.order_items VALUES (%s, 1, "
            f"(SELECT min(id) FROM {schema}.products), 1, 5)",
            [order],
        )
    return time.time()


def _paced_orders(dsn: str, schema: str, rate: int, stop: threading.Event) -> None:
    """Background orders at `rate` rows/s, committed in 10 ms slices."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        started, written = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate) - written
            if due > 0:
                conn.execute(
                    f"INSERT INTO {schema}.orders (customer_id, created_at) SELECT "
                    f"(SELECT min(id) FROM {schema}.customers), now() FROM generate_series(1, %s)",
                    [due],
                )
                written += due
            time.sleep(0.01)


def _wait_serving(
    http: httpx.Client, url: str, process: subprocess.Popen[bytes], log_file: Path
) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the projector stopped: {log_file.read_text()[-2000:]}")
        try:
            answer = http.post(url, json={"sql": "SELECT count() FROM read_models.daily_sales"})
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"daily_sales was not served in time: {log_file.read_text()[-2000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
