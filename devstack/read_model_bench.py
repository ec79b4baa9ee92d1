"""`projector read-model-bench` (part of `make bench`): materialized read models against the views
over the replicas they replaced, side by side in one run.

1. Read side, on one chDB engine in this process: replicas of `orders` orders (default 10M),
   three lines each, `customers` customers and `products` products are generated straight into
   replica tables shaped like the projector's (every metadata column), then ~10% of the orders
   get a newer version (another status) and ~3% are deleted with their lines. The read models are
   built from them by the projector's own backfill (projector/read_models/maintenance.py), timed.
2. Per read model, a point lookup and a full scan (top-100 for the customer and product rankings),
   p50 and p99 over repeated runs: on the materialized model (`read_models.<name>`) and on the
   same definition evaluated over the replicas read with FINAL (what the views did).
3. Write side, on the real stack: a bulk shop workload in Postgres (inserts, status updates,
   renames, price changes, deleted lines: ~`events` change events) projected by
   `projector run --until-kafka-end` twice on the same topics: read-model maintenance on and off.
4. Freshness: `projector run --serve` while a writer commits orders at `rate` rows/s; every
   `probe_every_s` one order lands on a day of its own, and the time from its commit until
   `daily_sales` shows that day through the query service is one sample.
Figures are ratios against baselines of the same run, appended to docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from devstack.query_bench import Latency, quantiles, timed
from devstack.read_model_write_bench import free_port, run_freshness, run_write_side
from projector.clickhouse import ChdbBackend, ident
from projector.read_models.definitions import load_definitions
from projector.read_models.maintenance import ReadModelMaintainer
from projector.replicas.catalog import META_COLUMNS

REPLICA, READ_MODELS, CONTROL = "replica_shop", "read_models", "projector"
STATUSES = "['PENDING', 'CONFIRMED', 'SHIPPED', 'DELIVERED', 'CANCELLED']"
SOURCE_COLUMNS = {
    "customers": (["id"], "id Int64, name String, email String, created_at DateTime64(6, 'UTC')"),
    "products": (["id"], "id Int64, name String, price Decimal(10, 2)"),
    "orders": (
        ["id"],
        "id Int64, customer_id Int64, status String, "
        "created_at DateTime64(6, 'UTC'), updated_at DateTime64(6, 'UTC')",
    ),
    "order_items": (
        ["order_id", "line_no"],
        "order_id Int64, line_no Int32, product_id Int64, "
        "quantity Int32, unit_price Decimal(10, 2)",
    ),
}
# The statements the named queries ran before the read models had indexes and a per-day
# statistics aggregate (each scanned or sorted order_summary or customer_lifetime_value whole):
# measured beside the shipped ones, on the same engine, as the API part's baseline.
BEFORE_INDEXES = {
    "orders_of_customer": "SELECT * FROM read_models.order_summary "
    "WHERE customer_id = {customer_id:Int64} ORDER BY created_at DESC, order_id DESC",
    "orders_in_status": "SELECT * FROM read_models.order_summary "
    "WHERE status = {status:String} ORDER BY created_at DESC, order_id DESC",
    "order_statistics": "SELECT count() AS orders, countIf(status = 'CANCELLED') AS cancelled, "
    "sumIf(units, status != 'CANCELLED') AS units, sumIf(total, status != 'CANCELLED') AS revenue "
    "FROM read_models.order_summary "
    "WHERE toDate(created_at) BETWEEN {start_date:Date} AND {end_date:Date}",
    "top_products": "SELECT product_id, name, units, revenue FROM read_models.product_popularity "
    "ORDER BY revenue DESC, product_id LIMIT {top:UInt32}",
    "top_customers": "SELECT customer_id, name, orders, revenue "
    "FROM read_models.customer_lifetime_value ORDER BY revenue DESC, customer_id LIMIT {top:UInt32}",
}
TARGETS_MS = {
    "point": 10.0,
    "daily_sales": 50.0,
    "monthly_sales": 50.0,
    "customer_lifetime_value": 100.0,
    "product_popularity": 100.0,
}


# ---- 1. the read side -------------------------------------------------------------------------


def generate_replicas(ch: ChdbBackend, orders: int, customers: int, products: int) -> None:
    """Replica tables as the projector would hold them after a long history."""
    ch.execute(f"CREATE DATABASE IF NOT EXISTS {REPLICA}")
    meta = ", ".join(f"{ident(n)} {t}" for n, t in META_COLUMNS.items())
    for table, (key, columns) in SOURCE_COLUMNS.items():
        ch.execute(
            f"CREATE TABLE {REPLICA}.{table} ({columns}, {meta}, INDEX _batch_rows "
            "(_partition, _offset) TYPE minmax GRANULARITY 1) ENGINE = "
            f"ReplacingMergeTree(_version, _is_deleted) ORDER BY ({', '.join(key)})"
        )

    def insert(
        table: str, columns: str, select: str, rows: int, version_base: int, deleted: int = 0
    ) -> None:
        op = "'d'" if deleted else "'r'"
        ch.execute(
            f"INSERT INTO {REPLICA}.{table} ({columns}, _version, _is_deleted, _op, _partition, "
            f"_offset) SELECT *, {version_base} + rowNumberInAllBlocks(), {deleted}, "
            f"{op}, 0, {version_base} + rowNumberInAllBlocks() "
            f"FROM ({select}) SETTINGS max_insert_threads = 2"
        )

    day0 = "toDateTime64('2023-01-01 00:00:00', 6, 'UTC')"
    insert(
        "customers",
        "id, name, email, created_at",
        f"SELECT number + 1, concat('Customer ', toString(number + 1)), "
        f"concat('c', toString(number + 1), '@example.com'), {day0} FROM numbers({customers})",
        customers,
        0,
    )
    insert(
        "products",
        "id, name, price",
        f"SELECT number + 1, concat('Product ', toString(number + 1)), "
        f"toDecimal64(1 + number % 19999 / 100, 2) FROM numbers({products})",
        products,
        0,
    )
    order_row = (
        "SELECT number + 1, 1 + cityHash64(number, 1) % {customers}, "
        "{statuses}[1 + cityHash64(number, {salt}) % 5], "
        "{day0} + toIntervalSecond(cityHash64(number, 3) % (3 * 365 * 86400)), {day0} "
        "FROM numbers({orders}) {where}"
    )
    fill = {"customers": customers, "statuses": STATUSES, "day0": day0, "orders": orders}
    insert(
        "orders",
        "id, customer_id, status, created_at, updated_at",
        order_row.format(**fill, salt=2, where=""),
        orders,
        0,
    )
    insert(
        "order_items",
        "order_id, line_no, product_id, quantity, unit_price",
        f"SELECT intDiv(number, 3) + 1, toInt32(number % 3 + 1), "
        f"1 + cityHash64(number, 5) % {products}, toInt32(1 + cityHash64(number, 6) % 5), "
        f"toDecimal64(1 + cityHash64(number, 7) % 19999 / 100, 2) FROM numbers({orders * 3})",
        orders * 3,
        0,
    )
    # ~10% updated (a newer version with another status), ~3% deleted with their lines
    insert(
        "orders",
        "id, customer_id, status, created_at, updated_at",
        order_row.format(**fill, salt=8, where="WHERE cityHash64(number, 4) % 10 = 0"),
        0,
        10 * orders,
    )
    insert(
        "orders",
        "id, customer_id, status, created_at, updated_at",
        order_row.format(**fill, salt=2, where="WHERE cityHash64(number, 9) % 33 = 0"),
        0,
        20 * orders,
        deleted=1,
    )
    insert(
        "order_items",
        "order_id, line_no, product_id, quantity, unit_price",
        f"SELECT intDiv(number, 3) + 1, toInt32(number % 3 + 1), 0, 0, 0 "
        f"FROM numbers({orders * 3}) WHERE cityHash64(intDiv(number, 3), 9) % 33 = 0",
        0,
        20 * orders,
        deleted=1,
    )


def definition_over_replicas(name: str) -> str:
    """What the old view of `name` was: its definition evaluated over the replicas (FINAL)."""
    for family in load_definitions().families:
        entity = family.entity
        rows = entity.select(REPLICA, entity.all_keys(REPLICA))
        if entity.name == name:
            return f"SELECT * FROM ({rows}) SETTINGS join_use_nulls = 1"
        for aggregate in family.aggregates:
            if aggregate.name == name:
                return f"{aggregate.evaluated(f'({rows})')} SETTINGS join_use_nulls = 1"
    raise KeyError(name)


def read_side_queries(ch: ChdbBackend) -> dict[str, tuple[str, str]]:
    """Per read model: (point lookup, full scan) with `{m}` for the model's rows."""
    order = ch.rows(f"SELECT id FROM {REPLICA}.orders FINAL WHERE id % 1000 = 7 LIMIT 1")[0]["id"]
    day = "2024-06-01"
    return {
        "order_summary": (
            f"SELECT * FROM {{m}} WHERE order_id = {order}",
            "SELECT count(), sum(total) FROM {m}",
        ),
        "order_lines": (
            f"SELECT * FROM {{m}} WHERE order_id = {order}",
            "SELECT count(), sum(quantity) FROM {m}",
        ),
        "order_status": (
            f"SELECT * FROM {{m}} WHERE order_id = {order}",
            "SELECT count() FROM {m}",
        ),
        "daily_sales": (f"SELECT * FROM {{m}} WHERE day = '{day}'", "SELECT * FROM {m}"),
        "monthly_sales": (f"SELECT * FROM {{m}} WHERE month = '{day}'", "SELECT * FROM {m}"),
        "customer_lifetime_value": (
            "SELECT * FROM {m} WHERE customer_id = 4242",
            "SELECT * FROM {m} ORDER BY revenue DESC LIMIT 100",
        ),
        "product_popularity": (
            "SELECT * FROM {m} WHERE product_id = 4242",
            "SELECT * FROM {m} ORDER BY revenue DESC LIMIT 100",
        ),
        "orders_by_status": ("SELECT * FROM {m} WHERE status = 'PENDING'", "SELECT * FROM {m}"),
    }


def measure_api(
    ch: ChdbBackend, requests: int, clients: int, seconds: float, log: Any
) -> dict[str, dict[str, Any]]:
    """The shipped named queries through the HTTP API over these read models (query_bench's
    measurement) with the cache off — every request runs in ClickHouse (cache hits do not depend
    on the data's size: `projector query-bench` measures them) — and each query's SQL straight
    on the engine."""
    from devstack import query_bench
    from projector.commit.ledger import TransactionLedger
    from projector.config import ProjectorConfig
    from queries.named import load_named_queries
    from queries.server import BackgroundServer

    TransactionLedger(ch, CONTROL, "replica").create()
    results: dict[str, dict[str, Any]] = {}
    for label, entries in (("cache off", 0),):
        config = ProjectorConfig(
            api_token=query_bench.TOKEN,
            query_cache_entries=entries,
            metrics_port=0,
            transaction_metadata=False,
            ops_sample_s=3600,
        )
        server = BackgroundServer(config, ch, "127.0.0.1", free_port())
        server.start()
        try:
            for _ in range(100):
                try:
                    httpx.get(f"{server.address}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            log(f"named queries through the API ({label}) ...")
            results[label] = query_bench.measure(server.address, requests, clients, seconds)
        finally:
            server.stop()
    queries, direct, before = load_named_queries(), {}, {}
    for name, params in query_bench.PARAMS.items():
        query = queries[name]
        sql = f"SELECT * FROM ({query.sql}) LIMIT 101 OFFSET 0"
        direct[name] = quantiles(
            timed(partial(ch.query, sql, "JSONEachRow", query.bind(params)), requests)
        )
        if name in BEFORE_INDEXES:  # the baseline: what the query ran before, 20 times
            sql = f"SELECT * FROM ({BEFORE_INDEXES[name]}) LIMIT 101 OFFSET 0"
            before[name] = quantiles(
                timed(partial(ch.query, sql, "JSONEachRow", query.bind(params)), 20)
            )
    results["direct"] = {"queries": direct}
    results["before"] = {"queries": before}
    return results


@dataclass
class ReadSide:
    orders: int
    build_s: float
    rows: dict[str, int]
    materialized: dict[str, tuple[Latency, Latency]]
    views: dict[str, tuple[Latency, Latency]]
    floor: Latency  # `SELECT 1` on the same engine: what any query costs here
    api: dict[str, dict[str, Any]] | None = None  # named queries through the HTTP API


def run_read_side(
    orders: int,
    customers: int,
    products: int,
    fast_runs: int,
    view_runs: int,
    log: Any,
    with_views: bool = True,
    api: bool = False,
) -> ReadSide:
    work = Path(tempfile.mkdtemp(prefix="projector-rm-bench-"))
    ch = ChdbBackend(str(work / "chdb"))
    try:
        log(
            f"generating replicas: {orders:,} orders, {orders * 3:,} lines, {customers:,} "
            f"customers, {products:,} products ..."
        )
        generate_replicas(ch, orders, customers, products)
        maintainer = ReadModelMaintainer(
            ch, load_definitions(), "shop", REPLICA, READ_MODELS, CONTROL
        )
        log("building the read models with the projector's backfill ...")
        started = time.perf_counter()
        maintainer.family_versions.ensure()
        while maintainer.building:
            progress = maintainer.backfill_step()
            log(f"  {progress}")
        build_s = time.perf_counter() - started
        floor = quantiles(timed(partial(ch.rows, "SELECT 1"), fast_runs))
        rows = {}
        materialized, views = {}, {}
        for name, (point, scan) in read_side_queries(ch).items():
            table = f"{READ_MODELS}.{name}"
            rows[name] = int(ch.rows(f"SELECT count() AS n FROM {table}")[0]["n"])
            log(f"{name}: {rows[name]:,} rows; timing ...")
            over = f"({definition_over_replicas(name)})"
            materialized[name] = (
                quantiles(timed(partial(ch.rows, point.format(m=table)), fast_runs)),
                quantiles(timed(partial(ch.rows, scan.format(m=table)), fast_runs)),
            )
            if with_views:  # 3 to 45 s each at 10M orders
                views[name] = (
                    quantiles(timed(partial(ch.rows, point.format(m=over)), view_runs)),
                    quantiles(timed(partial(ch.rows, scan.format(m=over)), view_runs)),
                )
        served = measure_api(ch, 200, 8, 10, log) if api else None
        return ReadSide(orders, build_s, rows, materialized, views, floor, served)
    finally:
        ch.close()
        shutil.rmtree(work, ignore_errors=True)


# ---- 3. the write side: maintenance on and off ------------------------------------------------


# ---- 4. freshness into daily_sales ------------------------------------------------------------


# ---- report -----------------------------------------------------------------------------------


def render(
    read: ReadSide | None,
    write: dict[str, float] | None,
    fresh: tuple[int, Latency] | None,
    command: str,
) -> str:
    lines = [
        f"### {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC — read models: materialized vs views",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end "
        "(other work on the machine shares its cores).",
    ]
    if read is not None:
        lines += [
            "",
            f"Read side: {read.orders:,} orders ({read.orders * 3:,} lines) in replicas; the "
            f"read models built from them by the backfill in {read.build_s:.0f} s. Latency in ms "
            "(p50 / p99); 'view' = the same definition over the replicas read with FINAL. "
            f"Floor: `SELECT 1` on the same engine takes {_l(read.floor)} ms.",
            "",
            "| read model | rows | point: materialized | point: view | point speed-up "
            "| full: materialized | full: view | full speed-up | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, (m_point, m_full) in read.materialized.items():
            v_point, v_full = read.views.get(name, (NOT_MEASURED, NOT_MEASURED))
            target = TARGETS_MS.get(name)
            verdict = [
                f"point p99 ≤ {TARGETS_MS['point']:.0f}: "
                f"{'met' if m_point.p99_ms <= TARGETS_MS['point'] else 'MISSED'}"
            ]
            if target is not None:
                verdict.append(
                    f"full p99 ≤ {target:.0f}: {'met' if m_full.p99_ms <= target else 'MISSED'}"
                )
            lines.append(
                f"| {name} | {read.rows[name]:,} | {_l(m_point)} | {_l(v_point)} | "
                f"{_x(v_point, m_point)} | {_l(m_full)} | {_l(v_full)} | {_x(v_full, m_full)} | "
                f"{'; '.join(verdict)} |"
            )
    if read is not None and read.api is not None:
        off, direct = read.api["cache off"], read.api["direct"]["queries"]
        before = read.api["before"]["queries"]
        lines += [
            "",
            "Named queries through the HTTP API over these read models, cache off (every request "
            "runs in ClickHouse), 200 sequential requests each; 'direct' = the same SQL on the "
            "engine without HTTP; 'before' = the statement the query ran before the read models "
            "had indexes (a scan of `order_summary` or `customer_lifetime_value`), direct, 20 "
            "runs, same engine and data. Target p99 ≤ 50 ms.",
            "",
            "| query | p50 ms | p99 ms | direct p50 ms | HTTP / direct | before: direct p50 / "
            "p99 ms | before / direct (p50) | p99 ≤ 50 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, latency in off["queries"].items():
            floor, old = direct[name], before.get(name)
            lines.append(
                f"| {name} | {latency.p50_ms:.1f} | {latency.p99_ms:.1f} | {floor.p50_ms:.1f} | "
                f"{latency.p50_ms / max(floor.p50_ms, 1e-3):.1f} | "
                + (
                    f"{_l(old)} | {old.p50_ms / max(floor.p50_ms, 1e-3):,.0f}x | "
                    if old
                    else "| | "
                )
                + f"{'met' if latency.p99_ms <= 50 else 'MISSED'} |"
            )
        health = off["health"]
        lines += [
            "",
            f"`GET /health` through the same server and client (the HTTP floor): p50 "
            f"{health.p50_ms:.1f} ms, p99 {health.p99_ms:.1f} ms.",
            "",
            f"Throughput on `order_by_id`, cache off, wrk with 8 connections: "
            f"{off['rps']:,.0f} requests/s; "
            f"`GET /health` with the same load generator {off['health_rps']:,.0f} requests/s "
            f"(ratio {off['rps'] / max(off['health_rps'], 1e-9):.2f}).",
        ]
    if write is not None:
        share = write["on"] / write["off"]
        lines += [
            "",
            f"Write side: {int(write['events']):,} shop change events, `run --until-kafka-end`: "
            f"maintenance off {write['off']:,.0f} events/s, on {write['on']:,.0f} events/s: "
            f"on/off = {share:.2f} (target ≥ 0.70: {'met' if share >= 0.7 else 'MISSED'}).",
        ]
    if fresh is not None:
        rate, latency = fresh
        lines += [
            "",
            f"Freshness at {rate} orders/s: commit → visible in `daily_sales` through the query "
            f"service: p50 {latency.p50_ms:.0f} ms, p99 {latency.p99_ms:.0f} ms (target p99 ≤ "
            f"1000 ms: {'met' if latency.p99_ms <= 1000 else 'MISSED'}).",
        ]
    return "\n".join(lines)


NOT_MEASURED = Latency(float("nan"), float("nan"))


def _x(slow: Latency, fast: Latency) -> str:
    """How many times faster `fast` is at p50 ('—' when `slow` was not measured)."""
    if slow.p50_ms != slow.p50_ms:
        return "—"
    return f"{slow.p50_ms / max(fast.p50_ms, 0.001):,.0f}x"


def _l(latency: Latency) -> str:
    if latency.p50_ms != latency.p50_ms:  # NaN: not measured in this run
        return "—"
    return f"{latency.p50_ms:,.1f} / {latency.p99_ms:,.1f}"


def run_read_model_bench(
    orders: int,
    write_events: int,
    rate: int,
    log: Any,
    report: Path | None,
    command: str,
    parts: set[str],
) -> str:
    read = (
        run_read_side(
            orders,
            max(1000, orders // 10),
            max(100, orders // 100),
            50,
            3,
            log,
            with_views="read" in parts,
            api="api" in parts,
        )
        if parts & {"read", "api"}
        else None
    )
    write = run_write_side(write_events, log) if "write" in parts else None
    fresh = (rate, run_freshness(rate, 30, 0.2, log)) if "freshness" in parts else None
    text = render(read, write, fresh, command)
    log(text)
    if report is not None:
        with report.open("a") as out:
            out.write("\n" + text + "\n")
    return text
