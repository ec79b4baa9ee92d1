"""`projector bench` (`make bench`): throughput of the projector against baselines, in one run.

1. Debezium registers the real key and value schemas of a `bench.orders` table (one row written
   through the real stack); one real event is the template of every generated one.
2. N change events (creates, updates, deletes with tombstones, snapshot reads; default 1M) are
   encoded with those schemas in the Confluent wire format and produced to a fresh topic.
3. Each contender runs as its own process on the same topic or bytes, timed wall-clock with its
   peak RSS:
   (b) the projector's per-message path: `projector run --until-kafka-end` (Kafka → chDB, with the
       commit protocol, replica semantics and all);
   (c) a naive baseline: confluent-kafka's `AvroDeserializer` per message, rows inserted into chDB
       in batches of 10,000 (no versions, no exactly-once);
   (d) the C++ ceiling: chDB decoding the same message bytes from a file (`AvroConfluent`) and
       inserting them.
   (a) the projector's fast path: the same command with ClickHouse decoding the raw bytes
       (projector/replicas/fast_path.py), batches of `--batch-messages` (default 50,000);
   (e) `projector rebuild bench.orders --from kafka` right after (a), on (a)'s engine: the same
       events read again into a shadow table, verified against the live one and swapped in;
4. Prints events/s and ratios, and appends the run to docs/benchmarks.md.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import psycopg
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from devstack.capture import create_and_capture
from projector.config import client_environment
from schemas.registry import REQUEST_TIMEOUT_S

SCHEMA, TABLE = "bench", "orders"
DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.{TABLE} (
    id bigint PRIMARY KEY, customer_id bigint NOT NULL, status text NOT NULL,
    amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, note text)
"""
STATUSES = ("PENDING", "CONFIRMED", "SHIPPED", "DELIVERED", "CANCELLED")
BASELINE_BATCH = 10_000


@dataclass(frozen=True)
class Schemas:
    key_id: int
    key: Any
    value_id: int
    value: Any
    template: dict[str, Any]  # one real decoded event


def prepare(env: dict[str, str], log: Any) -> Schemas:
    """Let Debezium register the table's schemas, and keep one real event as a template."""
    create_and_capture(env, DDL, SCHEMA)
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {SCHEMA}.{TABLE} VALUES (0, 1, 'PENDING', 1.00, now(), 'template') "
            "ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note || ''"
        )
    topic = f"cdc.{SCHEMA}.{TABLE}"
    log(f"waiting for Debezium to register the schemas of {topic} ...")
    message = _first_message(env["KAFKA_BOOTSTRAP"], topic)
    registry = SchemaRegistryClient({"url": env["REGISTRY_URL"], "timeout": REQUEST_TIMEOUT_S})
    key_id = int.from_bytes(message[0][1:5], "big")
    value_id = int.from_bytes(message[1][1:5], "big")
    key = fastavro.parse_schema(json.loads(registry.get_schema(key_id).schema_str or ""))
    value = fastavro.parse_schema(json.loads(registry.get_schema(value_id).schema_str or ""))
    template = fastavro.schemaless_reader(io.BytesIO(message[1][5:]), value, None)
    assert isinstance(template, dict)
    return Schemas(key_id, key, value_id, value, template)


def _first_message(bootstrap: str, topic: str, timeout_s: float = 120) -> tuple[bytes, bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1)
            if msg is None or msg.error() or not msg.value() or not msg.key():
                continue
            return msg.key(), msg.value()  # type: ignore[return-value]
    finally:
        consumer.close()
    raise RuntimeError(f"no event on {topic} after {timeout_s:.0f}s: is the connector running?")


def generate(
    schemas: Schemas, events: int, seed: int
) -> tuple[list[tuple[bytes, bytes | None]], int]:
    """`events` framed messages (tombstones after deletes count as events) and the number of
    live keys they leave."""
    rng = random.Random(seed)
    key_prefix = b"\x00" + schemas.key_id.to_bytes(4, "big")
    value_prefix = b"\x00" + schemas.value_id.to_bytes(4, "big")
    live: dict[int, dict[str, Any]] = {}
    next_id, lsn = 1, 10_000_000
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[tuple[bytes, bytes | None]] = []
    buffer = io.BytesIO()

    def encode(schema: Any, datum: dict[str, Any]) -> bytes:
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, schema, datum)
        return buffer.getvalue()

    while len(out) < events:
        roll = rng.random()
        lsn += rng.randint(100, 400)
        if roll < 0.55 or len(live) < 100:
            op, key = ("r" if roll < 0.05 else "c"), next_id
            next_id += 1
            before = None
            after = {
                "id": key,
                "customer_id": rng.randint(1, 50_000),
                "status": "PENDING",
                "amount": cents(rng.randint(100, 10**7)),
                "created_at": (start + timedelta(seconds=key)).isoformat().replace("+00:00", "Z"),
                "note": rng.choice([None, "gift wrap", "leave at the door"]),
            }
        else:
            key = rng.choice(list(live)) if len(live) < 5000 else next_id - rng.randint(1, 5000)
            if key not in live:
                continue
            before = live[key]
            if roll < 0.88:
                op = "u"
                after = {
                    **before,
                    "status": rng.choice(STATUSES),
                    "amount": cents(rng.randint(100, 10**7)),
                }
            else:
                op, after = "d", None
        envelope = {
            **schemas.template,
            "before": before,
            "after": after,
            "op": op,
            "source": {
                **schemas.template["source"],
                "lsn": lsn,
                "txId": lsn // 1000,
                "snapshot": "incremental" if op == "r" else "false",
                "table": TABLE,
            },
            "transaction": None,
        }
        key_bytes = key_prefix + encode(schemas.key, {"id": key})
        out.append((key_bytes, value_prefix + encode(schemas.value, envelope)))
        if op == "d":
            live.pop(key, None)
            out.append((key_bytes, None))  # the tombstone
        else:
            assert after is not None
            live[key] = after
    return out[:events], len(live)


def cents(amount: int) -> Decimal:
    return (Decimal(amount) / 100).quantize(Decimal("0.01"))


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 100,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
        }
    )
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, partition=0)
                break
            except BufferError:
                producer.poll(0.1)
    producer.flush(120)


# ---- the contenders, each in its own process ----------------------------------------------------


@dataclass(frozen=True)
class Result:
    name: str
    events: int
    seconds: float
    peak_rss_mb: float
    note: str = ""
    stderr: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def timed_process(name: str, command: list[str], env: dict[str, str], events: int) -> Result:
    """Run a contender; its peak RSS is sampled from /proc (VmHWM), because the rusage of a child
    forked from this process would count this process's memory too."""
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_kb = 0
    status_file = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    seconds = time.monotonic() - started
    stdout, stderr = (
        stream.read().decode() if stream else "" for stream in (process.stdout, process.stderr)
    )
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {process.returncode}):\n{stderr[-3000:]}")
    last_line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return Result(name, events, seconds, peak_kb / 1024, last_line, stderr)


def baseline_main(bootstrap: str, topic: str, registry_url: str, chdb_dir: str) -> None:
    """(c): AvroDeserializer per message, rows inserted in batches (its own process)."""
    import chdb.session
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    session = chdb.session.Session(chdb_dir)
    session.query(
        "CREATE TABLE IF NOT EXISTS orders (id Int64, customer_id Int64, status String, "
        "amount Decimal(12, 2), created_at String, note Nullable(String), op String, lsn Int64) "
        "ENGINE = MergeTree ORDER BY id"
    )
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry_url, "timeout": 10}))
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"baseline-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    rows: list[str] = []
    inserted = 0

    def flush() -> None:
        nonlocal inserted
        if rows:
            session.query("INSERT INTO orders FORMAT JSONEachRow\n" + "\n".join(rows))
            inserted += len(rows)
            rows.clear()

    while True:
        batch = consumer.consume(10_000, 1.0)
        done = False
        for msg in batch:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    done = True
                    continue
                raise RuntimeError(error)
            value = msg.value()
            if value is None:
                continue
            # ctx=None: decode by the message's schema id only (no subject lookups).
            event = deserialize(value, None)
            image = event["after"] or event["before"]
            rows.append(
                json.dumps(
                    {
                        **image,
                        "amount": str(image["amount"]),
                        "op": event["op"],
                        "lsn": event["source"]["lsn"] or 0,
                    }
                )
            )
            if len(rows) >= BASELINE_BATCH:
                flush()
        if done:
            break
    flush()
    consumer.close()
    print(f"{inserted} rows inserted")


def ceiling_main(path: str, registry_url: str) -> None:
    """(d): chDB decodes the concatenated messages itself and inserts them (its own process)."""
    import chdb.session

    session = chdb.session.Session(str(Path(path).parent / "ceiling"))  # removed with the rest
    session.query(
        "CREATE TABLE orders (id Int64, customer_id Int64, status String, amount Decimal(12, 2), "
        "created_at String, note Nullable(String), op String, lsn Int64) "
        "ENGINE = MergeTree ORDER BY id"
    )
    session.query(
        "INSERT INTO orders SELECT if(op = 'd', before.id, after.id), "
        "if(op = 'd', before.customer_id, after.customer_id), "
        "if(op = 'd', before.status, after.status), if(op = 'd', before.amount, after.amount), "
        "if(op = 'd', before.created_at, after.created_at), "
        "if(op = 'd', before.note, after.note), op, ifNull(source.lsn, 0) "
        f"FROM file('{path}', 'AvroConfluent') "
        f"SETTINGS format_avro_schema_registry_url = '{registry_url}'"
    )
    count = session.query("SELECT count() FROM orders", "CSV").bytes().decode().strip()
    print(f"{count} rows inserted")


# ---- the run -----------------------------------------------------------------------------------


def run_bench(
    events: int,
    seed: int,
    log: Any,
    report_path: Path | None,
    profile: Path | None = None,
    batch_messages: int = 50_000,
    only: str = "abcde",
) -> list[Result]:
    """`only`: the contenders to run, by letter ((e) needs (a): it rebuilds (a)'s table)."""
    from devstack import Stack

    if "e" in only and "a" not in only:
        raise RuntimeError("(e) rebuilds the table (a) built: run (a) with it")

    stack = Stack()
    stack.up(log=log)
    env = client_environment()  # the stack just written, under the process environment
    schemas = prepare(env, log)
    log(f"generating {events:,} change events ...")
    messages, live_keys = generate(schemas, events, seed)
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.{SCHEMA}.{TABLE}"
    log(f"producing them to {topic} ...")
    produce(env["KAFKA_BOOTSTRAP"], topic, messages)
    work = Path(tempfile.mkdtemp(prefix="projector-bench-"))
    values = work / "values.bin"
    values.write_bytes(b"".join(v for _, v in messages if v is not None))
    python = sys.executable
    projector = str(Path(python).parent / "projector")
    results = []
    try:
        for label, name, fast in (
            ("(a)", "(a) projector, fast path", True),
            ("(b)", "(b) projector, per-message path", False),
        ):
            if label[1] not in only:
                continue
            log(f"{name} ...")
            run_env = {
                **env,
                "PROJECTOR_TOPIC_PREFIX": prefix,
                "PROJECTOR_SCHEMAS": SCHEMA,
                "PROJECTOR_TABLE_PATTERN": TABLE,
                "PROJECTOR_CHDB_PATH": str(work / label.strip("()")),
                "PROJECTOR_GROUP_ID": f"{prefix}-{label.strip('()')}",
                "PROJECTOR_MAX_BATCH_MESSAGES": str(batch_messages),
                "PROJECTOR_FAST_PATH": str(fast).lower(),
                "PROJECTOR_TRANSACTION_METADATA": "false",
            }
            # The events were produced to Kafka directly: its end is the whole backlog.
            command = [projector, "run", "--until-kafka-end"]
            if profile is not None:  # sampled by py-spy: where the time goes (slows the run a bit)
                command = [
                    str(Path(python).parent / "py-spy"),
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "50",
                    "-o",
                    f"{profile}.{label.strip('()')}",
                    "--",
                    *command,
                ]
            result = timed_process(name, command, run_env, events)
            fast_applied = re.search(r"\((\d+) by the fast path\)", result.stderr)
            results.append(
                replace(
                    result,
                    note=f"{fast_applied.group(1) if fast_applied else '?'} by the fast path",
                )
            )
            check = subprocess.run(
                [
                    projector,
                    "sql",
                    "--format",
                    "csv",
                    f"SELECT count() FROM replica_{SCHEMA}.{TABLE} FINAL",
                ],
                env=run_env,
                capture_output=True,
                text=True,
                check=True,
            )
            replica_rows = int(check.stdout.strip().splitlines()[-1])
            if replica_rows != live_keys:
                raise RuntimeError(
                    f"{name}: replica has {replica_rows} rows, the events leave {live_keys}"
                )
            if fast and "e" in only:  # (e): the same table rebuilt from the same topic
                log("(e) projector rebuild --from kafka ...")
                command = [projector, "rebuild", f"{SCHEMA}.{TABLE}", "--from", "kafka"]
                if profile is not None:
                    command = [
                        str(Path(python).parent / "py-spy"),
                        "record",
                        "--format",
                        "raw",
                        "--idle",
                        "--rate",
                        "50",
                        "-o",
                        f"{profile}.e",
                        "--",
                        *command,
                    ]
                results.append(
                    timed_process(
                        "(e) projector rebuild --from kafka (fast path, verified, swapped)",
                        command,
                        {
                            **run_env,
                            "PROJECTOR_REPLICA_REBUILD_CHUNK_MESSAGES": str(batch_messages),
                        },
                        events,
                    )
                )
        if "c" in only:
            log("(c) naive baseline ...")
            results.append(
                timed_process(
                    "(c) naive: AvroDeserializer + batched inserts",
                    [
                        python,
                        "-m",
                        "devstack.bench",
                        "baseline",
                        env["KAFKA_BOOTSTRAP"],
                        topic,
                        env["REGISTRY_URL"],
                        str(work / "baseline"),
                    ],
                    env,
                    events,
                )
            )
        if "d" in only:
            log("(d) ClickHouse decoding the bytes itself ...")
            results.append(
                timed_process(
                    "(d) C++ ceiling: chDB AvroConfluent from a file",
                    [python, "-m", "devstack.bench", "ceiling", str(values), env["REGISTRY_URL"]],
                    env,
                    events,
                )
            )
    finally:
        AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]}).delete_topics([topic])
        shutil.rmtree(work, ignore_errors=True)  # the bytes and every contender's engine: GBs
    report = render_report(results, events, live_keys)
    log(report)
    if report_path is not None:
        with report_path.open("a") as out:
            out.write("\n" + report + "\n")
    return results


def render_report(results: list[Result], events: int, live_keys: int) -> str:
    lines = [
        f"### {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC — {events:,} events, {live_keys:,} live keys",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        "",
        "| contender | events/s | seconds | peak RSS MB |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {r.rate:,.0f} | {r.seconds:.1f} | {r.peak_rss_mb:,.0f} |" for r in results
    ]
    by = {r.name[:3]: r for r in results}
    if all(k in by for k in ("(a)", "(b)", "(c)", "(d)")):
        a, b, c, d = by["(a)"], by["(b)"], by["(c)"], by["(d)"]
        lines += [
            "",
            f"Ratios: (a)/(c) = {a.rate / c.rate:.2f} (target ≥ 4.5), "
            f"(a)/(d) = {a.rate / d.rate:.2f} (target ≥ 0.75), (a)/(b) = {a.rate / b.rate:.1f}, "
            f"(b)/(c) = {b.rate / c.rate:.2f}. (a): {a.note}.",
        ]
    if "(a)" in by and "(e)" in by:
        a, e = by["(a)"], by["(e)"]
        lines += [
            "",
            f"Replica rebuild: (e)/(a) = {e.rate / a.rate:.2f} (the rebuild reads, applies and "
            f"verifies the same events the first projection applied); 10M events would take "
            f"{10_000_000 / e.rate:.0f} s at (e)'s rate (target ≤ 60 s).",
        ]
    if "(a)" in by and "(d)" in by:  # the live path's read-ahead (issue 23, item 1)
        a, d = by["(a)"], by["(d)"]
        live = f"Live path: (a)/(d) = {a.rate / d.rate:.2f} (target ≥ 0.35 at 10M events)"
        if "(e)" in by:
            live += f", (a)/(e) = {a.rate / by['(e)'].rate:.2f} (target ≥ 1)"
        lines += ["", live + "; docs/benchmarks.md has the profile of what separates (a) from (d)."]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "baseline":
        baseline_main(*sys.argv[2:6])
    elif sys.argv[1] == "ceiling":
        ceiling_main(*sys.argv[2:4])
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
        file=sys.stderr,
    )
