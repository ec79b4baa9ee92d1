"""`projector freshness` (part of `make bench`): how soon a committed row is visible in ClickHouse.

1. A `bench.fresh` table is captured by the real connector; one projector process (`projector run`,
   defaults, fast path) projects it.
2. For each rate (default 1,000 and 5,000 writes/s) a writer commits single-row transactions at that
   rate for `duration` seconds (psycopg pipeline mode, paced against the clock), every row tagged
   with its run.
3. Latency of a row = `_ingested_at - _commit_ts` in its replica row: ClickHouse's clock when the
   projector's insert carrying the row started, minus Postgres' commit time as Debezium reports it
   (both on this machine's clock, millisecond precision). The insert itself then takes the batch
   time the projector's `projector_batch_seconds` histogram reports, printed beside the quantiles.
4. Debezium's share: from the topic itself, Kafka timestamp - commit time of every event (when
   Kafka Connect produced it); the rest is Kafka plus the projector.
5. The Debezium ceiling: a burst of single-row transactions written as fast as one pipelined
   connection can; Debezium's rate is the burst's events over the span of their Kafka timestamps.
6. Then paced runs at the ceiling (`ceiling=True`): from the burst's rate down by a quarter each
   time, until Debezium keeps up for a whole run (its own p99 within a second, the writer at the
   rate): the highest rate the source side sustains here, where users would first feel the
   projector's share. The runs above it stay in the report (Debezium falls behind there).
7. Read models, side by side: the projector keeps a read model over the table (`fresh_rows`, one
   row per written row, `READ_MODELS`), maintained in each batch's commit as in production. A
   row's read-model latency = when the projector recomputed it (`now64` in its definition, read
   by ClickHouse as the maintainer's statement runs; the insert follows in the same commit)
   minus the Postgres commit: the same "insert start" instant as the replica's `_ingested_at`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

from devstack.capture import create_and_capture
from projector.config import client_environment
from projector.operations.status import collect_live_status

SCHEMA, TABLE = "bench", "fresh"
# The ceiling run: from the burst's rate down by CEILING_STEP until Debezium's own p99 (Kafka
# timestamp - commit) stays within SUSTAINED_P99_MS for a whole run; at most CEILING_ATTEMPTS runs.
SUSTAINED_P99_MS, CEILING_STEP, CEILING_ATTEMPTS = 1_000, 0.75, 4
READ_MODEL = "fresh_rows"
READ_MODELS = f"""
[[entity]]
name = "{READ_MODEL}"
description = "One row per written row, stamped when the projector recomputed it (freshness bench)."
sources = ["{TABLE}"]
key = ["id"]
keys = "SELECT id FROM {{{TABLE}}}"
sql = \"\"\"
SELECT id, run, _commit_ts AS committed_at, now64(3) AS computed_at
FROM {{{TABLE}}} WHERE id IN {{keys}}
\"\"\"

[entity.affects]
{TABLE} = "SELECT id FROM {{changed}}"
"""
DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.{TABLE} (
    id bigserial PRIMARY KEY, run text NOT NULL, payload text NOT NULL)
"""


@dataclass(frozen=True)
class RunResult:
    name: str
    target_rate: int
    achieved_rate: float
    rows: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    read_model_p50_ms: float = 0.0  # recomputed into `fresh_rows` - commit time
    read_model_p99_ms: float = 0.0
    debezium_p50_ms: float = 0.0  # Kafka timestamp - commit time: Debezium + Connect's share
    debezium_p99_ms: float = 0.0


def write_paced(dsn: str, run: str, rate: int, duration_s: float) -> float:
    """Commit `rate` single-row transactions per second for `duration_s`; the achieved rate."""
    total = int(rate * duration_s)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.pipeline() as pipeline:
        started = time.monotonic()
        for i in range(total):
            ahead = started + i / rate - time.monotonic()
            if ahead > 0.002:
                pipeline.sync()  # send what is queued, then wait for the next slot
                time.sleep(ahead)
            conn.execute(
                f"INSERT INTO {SCHEMA}.{TABLE} (run, payload) VALUES (%s, %s)", [run, f"row {i}"]
            )
        pipeline.sync()
        return total / (time.monotonic() - started)


def applied_events(port: int, table: str) -> int:
    """Events of `table` the running projector has applied, from its metrics (0: no answer)."""
    report = collect_live_status(port, timeout_s=2)
    return sum(r["events"] for r in report["tables"] if r["table"] == table) if report else 0


def batch_seconds(port: int) -> tuple[float, float]:
    """(batches, mean seconds) over every path, from the projector's histogram."""
    report = collect_live_status(port, timeout_s=2)
    batches = report["batches"].values() if report else []
    count = sum(b.get("batches", 0) for b in batches)
    total = sum(b.get("seconds", 0) for b in batches)
    return count, (total / count if count else 0.0)


def debezium_latencies(
    bootstrap: str, registry_url: str, topic: str, first_offset: int
) -> tuple[dict[str, list[int]], dict[str, tuple[int, int]]]:
    """From the topic, per run: Kafka timestamp - commit time (ms) of each event, i.e. Debezium's
    and Kafka Connect's share of the latency; and the span of the run's Kafka timestamps."""
    from schemas.registry import SchemaCache

    schemas = SchemaCache(registry_url)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"fresh-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    latencies: dict[str, list[int]] = {}
    spans: dict[str, tuple[int, int]] = {}
    try:
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, first_offset)])
        position, deadline = first_offset, time.monotonic() + 120
        while position < end and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 1.0):
                if msg.error() is not None:
                    continue
                position = (msg.offset() or 0) + 1
                value = msg.value()
                if value is None:
                    continue
                event = schemas.decode(value)[1]
                run, stamp = event["after"]["run"], msg.timestamp()[1]
                latencies.setdefault(run, []).append(stamp - event["source"]["ts_ms"])
                low, high = spans.get(run, (stamp, stamp))
                spans[run] = (min(low, stamp), max(high, stamp))
    finally:
        consumer.close()
    return latencies, spans


def _ceiling_note(run: str, sustained: str) -> str:
    if run == sustained:
        return " (Debezium's sustained ceiling)"
    if "-ceiling" in run:
        return " (above Debezium's ceiling: it fell behind)"
    return ""


def burst_rate(env: dict[str, str], table: str, first_offset: int, run: str, rows: int) -> float:
    """Debezium's rate in the burst `run`: its rows over the span of their Kafka timestamps."""
    _, spans = debezium_latencies(
        env["KAFKA_BOOTSTRAP"], env["REGISTRY_URL"], f"cdc.{table}", first_offset
    )
    low, high = spans.get(run, (0, 0))
    return rows / max(0.001, (high - low) / 1000)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def run_freshness(
    rates: list[int],
    duration_s: float,
    burst: int,
    log: Any,
    report_path: Path | None,
    ceiling: bool = True,
) -> list[RunResult]:
    """`ceiling`: after the burst, paced runs from its rate down until Debezium keeps up (6.)."""
    from devstack import Stack

    stack = Stack()
    stack.up(log=log)
    env = client_environment()  # the stack just written, under the process environment
    dsn = env["ADMIN_DSN"]
    create_and_capture(env, DDL, SCHEMA)
    work = Path(tempfile.mkdtemp(prefix="projector-freshness-"))
    models = work / "read_models.toml"
    models.write_text(READ_MODELS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    tag = uuid.uuid4().hex[:6]
    run_env = {
        **env,
        "PROJECTOR_SCHEMAS": SCHEMA,
        "PROJECTOR_TABLE_PATTERN": TABLE,
        "PROJECTOR_CHDB_PATH": str(work / "chdb"),
        "PROJECTOR_GROUP_ID": f"fresh-{tag}",
        "PROJECTOR_TRANSACTION_METADATA": "false",
        "PROJECTOR_METRICS_PORT": str(port),
        "PROJECTOR_READ_MODELS_FILE": str(models),
        "PROJECTOR_READ_MODEL_SCHEMA": SCHEMA,
    }
    projector = str(Path(sys.executable).parent / "projector")
    log_file = (work / "projector.log").open("wb")
    process = subprocess.Popen([projector, "run"], env=run_env, stdout=log_file, stderr=log_file)
    table = f"{SCHEMA}.{TABLE}"
    written = 0
    runs: list[tuple[str, int, float]] = []
    sustained = ""  # the run at the highest rate Debezium kept up with
    batches = (0.0, 0.0)
    try:
        first_offset = topic_end(env["KAFKA_BOOTSTRAP"], f"cdc.{table}")
        log("warming up: the projector applies what the topic already holds ...")
        write_paced(dsn, f"{tag}-warmup", 1, 1)
        written = settled(port, table, process)  # the runs' events come on top of these
        for rate in rates:
            run = f"{tag}-{rate}"
            log(f"writing {rate:,} rows/s for {duration_s:.0f} s ...")
            achieved = write_paced(dsn, run, rate, duration_s)
            written += int(rate * duration_s)
            wait_applied(port, table, written, process)
            runs.append((run, rate, achieved))
        log(f"burst: {burst:,} single-row transactions as fast as one connection commits ...")
        started = time.monotonic()
        write_paced(dsn, f"{tag}-burst", 10**9, burst / 10**9)  # unpaced
        writer_rate = burst / (time.monotonic() - started)
        written += burst
        wait_applied(port, table, written, process)
        if ceiling:
            # From the burst's rate down, until Debezium keeps up for a whole run.
            rate = int(burst_rate(env, table, first_offset, f"{tag}-burst", burst))
            for attempt in range(CEILING_ATTEMPTS):
                run = f"{tag}-ceiling{attempt}"
                log(f"writing {rate:,} rows/s for {duration_s:.0f} s (Debezium's ceiling?) ...")
                start = topic_end(env["KAFKA_BOOTSTRAP"], f"cdc.{table}")
                achieved = write_paced(dsn, run, rate, duration_s)
                written += int(rate * duration_s)
                wait_applied(port, table, written, process)
                runs.append((run, rate, achieved))
                own = debezium_latencies(
                    env["KAFKA_BOOTSTRAP"], env["REGISTRY_URL"], f"cdc.{table}", start
                )[0].get(run, [])
                if percentile(own, 0.99) <= SUSTAINED_P99_MS and achieved >= 0.95 * rate:
                    sustained = run
                    break
                rate = int(rate * CEILING_STEP)
        batches = batch_seconds(port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        log_file.close()
    try:  # the latencies are read from the stopped projector's chDB directory
        return _report(
            projector,
            run_env,
            runs,
            tag,
            table,
            env,
            first_offset,
            burst,
            writer_rate,
            duration_s,
            batches,
            log,
            report_path,
            sustained,
        )
    finally:
        shutil.rmtree(work / "chdb", ignore_errors=True)  # the log stays, to look at


def _report(
    projector: str,
    run_env: dict[str, str],
    runs: list[tuple[str, int, float]],
    tag: str,
    table: str,
    env: dict[str, str],
    first_offset: int,
    burst: int,
    writer_rate: float,
    duration_s: float,
    batches: tuple[float, float],
    log: Any,
    report_path: Path | None,
    sustained: str = "",
) -> list[RunResult]:
    """Latencies per run from the replica (`projector sql` on the run's chDB directory) and
    Debezium's own from the topic; the report, logged and appended to `report_path`."""
    latencies, spans = debezium_latencies(
        env["KAFKA_BOOTSTRAP"], env["REGISTRY_URL"], f"cdc.{table}", first_offset
    )
    low, high = spans.get(f"{tag}-burst", (0, 0))
    debezium_rate = burst / max(0.001, (high - low) / 1000)
    results = [
        quantiles(
            projector,
            run_env,
            run,
            f"{rate:,} writes/s" + _ceiling_note(run, sustained),
            rate,
            achieved,
            int(rate * duration_s),
        )
        for run, rate, achieved in runs
    ]
    results.append(quantiles(projector, run_env, f"{tag}-burst", "burst", 0, writer_rate, burst))
    results = [
        replace(
            r,
            debezium_p50_ms=percentile(latencies.get(run, []), 0.5),
            debezium_p99_ms=percentile(latencies.get(run, []), 0.99),
        )
        for r, run in zip(results, [run for run, _, _ in runs] + [f"{tag}-burst"], strict=True)
    ]
    report = render(results, duration_s, debezium_rate, writer_rate, burst, batches)
    log(report)
    if report_path is not None:
        with report_path.open("a") as out:
            out.write("\n" + report + "\n")
    return results


def topic_end(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"fresh-{uuid.uuid4()}"})
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    except Exception:  # the topic does not exist yet: it will start at 0
        return 0
    finally:
        consumer.close()


def settled(port: int, table: str, process: subprocess.Popen[bytes]) -> int:
    """Events applied once the count has not moved for three seconds (at least one)."""
    wait_applied(port, table, 1, process)
    count, since = applied_events(port, table), time.monotonic()
    while time.monotonic() - since < 3:
        time.sleep(0.2)
        now = applied_events(port, table)
        if now != count:
            count, since = now, time.monotonic()
    return count


def wait_applied(port: int, table: str, rows: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while applied_events(port, table) < rows:
        if process.poll() is not None:
            raise RuntimeError(f"the projector exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{rows} rows of {table} not applied in 10 minutes")
        time.sleep(0.2)


def quantiles(
    projector: str,
    env: dict[str, str],
    run: str,
    name: str,
    rate: int,
    achieved: float,
    expected: int,
) -> RunResult:
    query = (
        "SELECT count() AS n, "
        "quantiles(0.5, 0.95, 0.99)(dateDiff('millisecond', _commit_ts, _ingested_at)) AS q, "
        "max(dateDiff('millisecond', _commit_ts, _ingested_at)) AS worst "
        f"FROM replica_{SCHEMA}.{TABLE} WHERE run = '{run}'"
    )
    done = subprocess.run(
        [projector, "sql", "--format", "json", query],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if int(row["n"]) != expected:
        raise RuntimeError(f"{name}: {row['n']} rows in ClickHouse, {expected} written")
    p50, p95, p99 = (float(v) for v in row["q"])
    modelled = json.loads(
        subprocess.run(
            [
                projector,
                "sql",
                "--format",
                "json",
                "SELECT count() AS n, quantiles(0.5, 0.99)(dateDiff('millisecond', committed_at, "
                f"computed_at)) AS q FROM read_models.{READ_MODEL} WHERE run = '{run}'",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    if int(modelled["n"]) != expected:
        raise RuntimeError(f"{name}: {modelled['n']} rows in {READ_MODEL}, {expected} written")
    m50, m99 = (float(v) for v in modelled["q"])
    return RunResult(
        name, rate, achieved, int(row["n"]), p50, p95, p99, float(row["worst"]), m50, m99
    )


def render(
    results: list[RunResult],
    duration_s: float,
    debezium_rate: float,
    writer_rate: float,
    burst: int,
    batches: tuple[float, float],
) -> str:
    lines = [
        f"### {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC — freshness, {duration_s:.0f} s per rate",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        "",
        "| writer | achieved writes/s | rows | replica p50 ms | p95 ms | p99 ms | max ms "
        "| read model p50 / p99 ms | of which Debezium p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {r.achieved_rate:,.0f} | {r.rows:,} | {r.p50_ms:,.0f} | {r.p95_ms:,.0f} "
        f"| {r.p99_ms:,.0f} | {r.max_ms:,.0f} | {r.read_model_p50_ms:,.0f} / "
        f"{r.read_model_p99_ms:,.0f} | {r.debezium_p50_ms:,.0f} / {r.debezium_p99_ms:,.0f} |"
        for r in results
    ]
    if debezium_rate >= 0.95 * writer_rate:
        ceiling = (
            f"Debezium kept up with the burst's writer ({writer_rate:,.0f} commits/s, "
            f"{debezium_rate:,.0f} events/s over the events' Kafka timestamps): its ceiling "
            "on this machine is above what one writer connection commits"
        )
    else:
        ceiling = (
            f"Debezium source ceiling: {debezium_rate:,.0f} events/s (Kafka timestamps of "
            f"the {burst:,}-row burst; the writer committed {writer_rate:,.0f}/s)"
        )
    lines += [
        "",
        f"{ceiling}. Latency = ClickHouse "
        f"insert start - Postgres commit: into the replica (`_ingested_at`), and into the read "
        f"model `{READ_MODEL}` kept in the same batch commit (when the projector recomputed the "
        f"row); the batches themselves took {batches[1] * 1000:.0f} ms "
        f"on average over {batches[0]:,.0f} batches.",
    ]
    return "\n".join(lines)
