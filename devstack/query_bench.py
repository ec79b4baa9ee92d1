"""`projector query-bench` (part of `make bench`): the query service's latency and throughput.

1. The shop (devstack/shop.py) in schema `qbench` writes `transactions` transactions; one
   `projector run --serve` on a fresh chDB directory projects them and serves the read models.
2. Latency: every shipped named query, `requests` sequential requests each through the HTTP API
   (keep-alive client), p50 and p99 — cache on (after the first request, hits while the watermark
   stands) and cache off (`PROJECTOR_QUERY_CACHE_ENTRIES=0`: every request runs in ClickHouse).
3. Throughput: `wrk` (Debian's package; C, one thread, `clients` keep-alive connections, for
   `seconds` seconds, bounded) on one named query, cache on and off. A Python load generator on
   the same two cores measured itself: it topped out near 600 requests/s whatever it asked.
4. Baselines of the same run: `GET /health` through the same server and client (the HTTP floor),
   and each query's SQL run directly on the same chDB engine (the ClickHouse floor).
Every figure is reported as a ratio against those baselines: never against another day's numbers.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from devstack.shop import ShopWriter, create_shop
from projector.config import client_environment

SCHEMA = "qbench"
TOKEN = "bench-token"
PARAMS: dict[str, dict[str, str]] = {  # a typical request of each shipped query
    "order_by_id": {"order_id": "1"},
    "orders_of_customer": {"customer_id": "1"},
    "orders_in_status": {"status": "PENDING"},
    "order_counts_by_status": {},
    "order_statistics": {"start_date": "2000-01-01", "end_date": "2100-01-01"},
    "daily_sales": {"start_date": "2000-01-01", "end_date": "2100-01-01"},
    "monthly_sales": {"start_date": "2000-01-01", "end_date": "2100-01-01"},
    "top_products": {"top": "10"},
    "top_customers": {"top": "10"},
}
LOAD_QUERY = "order_by_id"


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float


def quantiles(samples: list[float]) -> Latency:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Latency(statistics.median(ordered) * 1000, p99 * 1000)


def timed(call: Callable[[], Any], times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def load(url: str, params: dict[str, str], clients: int, seconds: float) -> float:
    """Requests/s answered 2xx by `wrk` (`clients` keep-alive connections on one thread, for
    `seconds` seconds, then it stops) to 127.0.0.1."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError(
            "the load generator `wrk` is missing: `make system-deps` (or "
            "`apt-get install wrk`) installs it"
        )
    target = str(httpx.URL(url, params=params))
    done = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{clients}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    return wrk_rate(done.stdout + done.stderr)


def wrk_rate(output: str) -> float:
    """2xx responses per second from wrk's report (its own count, less the non-2xx ones)."""
    total = WRK_TOTAL.search(output)
    if total is None:
        raise RuntimeError(f"wrk did not report a run: {output.strip()[-500:]}")
    failed = WRK_NON_2XX.search(output)
    answered = int(total.group(1)) - (int(failed.group(1)) if failed else 0)
    return answered / (float(total.group(2)) * WRK_UNITS[total.group(3)])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(
    env: dict[str, str], chdb: Path, cache: bool, log_file: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    run_env = {
        **env,
        "PROJECTOR_CHDB_PATH": str(chdb),
        "PROJECTOR_SCHEMAS": f"public,{SCHEMA}",
        "PROJECTOR_TABLE_PATTERN": "(customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": SCHEMA,
        "PROJECTOR_GROUP_ID": "query-bench",
        "PROJECTOR_METRICS_PORT": "0",
        "PROJECTOR_API_TOKEN": TOKEN,
        "PROJECTOR_QUERY_PORT": str(port),
        "PROJECTOR_QUERY_CACHE_ENTRIES": "10000" if cache else "0",
    }
    projector = str(Path(sys.executable).parent / "projector")
    with log_file.open("ab") as out:
        process = subprocess.Popen(
            [projector, "run", "--serve"], env=run_env, stdout=out, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{port}"


def wait_caught_up(
    url: str, min_lsn: str, process: subprocess.Popen[bytes], log_file: Path
) -> None:
    deadline = time.monotonic() + 600
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while True:
        try:
            answer = httpx.get(
                f"{url}/queries/order_counts_by_status",
                params={"min_lsn": min_lsn},
                headers=headers,
                timeout=60,
            )
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not catch up: {log_file.read_text()[-2000:]}")
        time.sleep(1)


def measure(url: str, requests: int, clients: int, seconds: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    out: dict[str, Any] = {"queries": {}}
    with httpx.Client(headers=headers, timeout=60) as http:
        out["health"] = quantiles(timed(lambda: http.get(f"{url}/health"), requests))
        for name, params in PARAMS.items():
            http.get(f"{url}/queries/{name}", params=params).raise_for_status()
            target = f"{url}/queries/{name}"

            def ask(target: str = target, params: dict[str, str] = params) -> Any:
                return http.get(target, params=params)

            out["queries"][name] = quantiles(timed(ask, requests))
    out["health_rps"] = load(f"{url}/health", {}, clients, seconds)
    before = served_counts(url)
    out["rps"] = load(f"{url}/queries/{LOAD_QUERY}", PARAMS[LOAD_QUERY], clients, seconds)
    after = served_counts(url)
    answered = after[0] - before[0]
    out["hit_share"] = (after[1] - before[1]) / answered if answered else 0.0
    return out


def served_counts(url: str) -> tuple[float, float]:
    """The service's own counts (its /metrics): `LOAD_QUERY` requests answered 200, cache hits."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    wanted = {
        f'query_requests_total{{route="/queries/{LOAD_QUERY}",status="200"}}': 0,
        'query_cache_total{result="hit"}': 1,
    }
    found = [0.0, 0.0]
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found[0], found[1]


def direct(chdb: Path, requests: int) -> dict[str, Latency]:
    """Each query's page SQL straight on the engine (the service's own statement), no HTTP."""
    from projector.clickhouse import ChdbBackend
    from queries.named import load_named_queries

    backend = ChdbBackend(str(chdb))
    queries = load_named_queries()
    try:
        result = {}
        for name, params in PARAMS.items():
            query = queries[name]
            sql = f"SELECT * FROM ({query.sql}) LIMIT 101 OFFSET 0"
            bound = query.bind(params)

            def run(sql: str = sql, bound: dict[str, str | None] = bound) -> str:
                return backend.query(sql, "JSONEachRow", bound)

            result[name] = quantiles(timed(run, requests))
        return result
    finally:
        backend.close()


def run_query_bench(
    transactions: int,
    requests: int,
    clients: int,
    seconds: float,
    log: Callable[[str], None],
    report_path: Path | None,
) -> str:
    env = client_environment()
    if "ADMIN_DSN" not in env:
        raise RuntimeError("no local stack: run `projector stack up` first")
    from devstack.capture import create_and_capture

    create_shop(env["ADMIN_DSN"], SCHEMA)
    create_and_capture(env, "", SCHEMA)  # the shop's tables into the publication
    log(f"shop writing {transactions:,} transactions into {SCHEMA} ...")
    ShopWriter(env["ADMIN_DSN"], SCHEMA, seed=42).run(rate_per_s=0, transactions=transactions)
    import psycopg

    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        ((lsn,),) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchall()
        ((orders,),) = conn.execute(f"SELECT count(*) FROM {SCHEMA}.orders").fetchall()
    work = Path(tempfile.mkdtemp(prefix="query-bench-"))
    chdb, log_file = work / "chdb", work / "service.log"
    results: dict[str, dict[str, Any]] = {}
    for cache in (True, False):
        label = "cache on" if cache else "cache off"
        process, url = start_service(env, chdb, cache, log_file)
        try:
            wait_caught_up(url, str(lsn), process, log_file)
            log(f"measuring ({label}) ...")
            results[label] = measure(url, requests, clients, seconds)
        finally:
            process.terminate()
            process.wait(60)
    results["direct"] = {"queries": direct(chdb, requests)}
    shutil.rmtree(chdb, ignore_errors=True)  # the log stays, to look at
    report = render(results, transactions, int(orders), requests, clients, seconds)
    log(report)
    if report_path is not None:
        with report_path.open("a") as out:
            out.write("\n" + report + "\n")
    return report


def render(
    results: dict[str, dict[str, Any]],
    transactions: int,
    orders: int,
    requests: int,
    clients: int,
    seconds: float,
) -> str:
    on, off, floor = results["cache on"], results["cache off"], results["direct"]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {now} — query service, {orders:,} orders ({transactions:,} shop transactions)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Linux {platform.release()}, load average {os.getloadavg()[0]:.1f} at the end (other "
        f"work on the machine shares its cores). {requests} sequential requests per query; "
        f"load generator: wrk, {clients} connections for {seconds:.0f} s.",
        "",
        "| query | p50 ms cache on | p99 ms cache on | p50 ms cache off | p99 ms cache off "
        "| direct p50 ms | cache off p50 / direct |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PARAMS:
        a, b, d = on["queries"][name], off["queries"][name], floor["queries"][name]
        lines.append(
            f"| {name} | {a.p50_ms:.1f} | {a.p99_ms:.1f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} "
            f"| {d.p50_ms:.1f} | {b.p50_ms / max(d.p50_ms, 1e-3):.1f} |"
        )
    health = on["health"]
    lines += [
        f"| `GET /health` (HTTP floor) | {health.p50_ms:.1f} | {health.p99_ms:.1f} | | | | |",
        "",
        f"Throughput on `{LOAD_QUERY}`: cache on {on['rps']:,.0f} requests/s (of which "
        f"{on['hit_share']:.0%} cache hits, by the service's metrics), cache off "
        f"{off['rps']:,.0f} requests/s; `GET /health` with the same load generator "
        f"{on['health_rps']:,.0f} requests/s. Ratios: cache-on / health = "
        f"{on['rps'] / max(on['health_rps'], 1e-9):.2f}, cache-off / cache-on = "
        f"{off['rps'] / max(on['rps'], 1e-9):.2f}.",
        "",
        "p99 target ≤ 50 ms for every query: "
        + (
            "met"
            if all(q.p99_ms <= 50 for r in (on, off) for q in r["queries"].values())
            else "NOT met (see the rows above 50)"
        )
        + f"; ≥ 1,000 requests/s on cache hits: {'met' if on['rps'] >= 1000 else 'NOT met'}.",
    ]
    return "\n".join(lines)
