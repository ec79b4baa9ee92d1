"""`projector bench --initial-load ROWS`: the first load of a big table, end to end and per stage.

1. Postgres: `bench_load.wide`, ROWS rows of 16 columns of common types (integers, numeric,
   text, varchar, char, boolean, date, timestamp, timestamptz, uuid, jsonb, double, real),
   written by `generate_series` (not measured).
2. A connector of its own (`bench-load`: its own slot, publication and topic prefix, created
   directly, so the stack's connector and its event triggers are untouched) whose initial
   snapshot reads the table, and a projector (`projector run`, a chDB directory of its own,
   read models over the table) started at the same moment: the end-to-end time is from the
   connector's creation until the projector has applied every row and its read models hold
   every row.
3. Each stage alone, for where the time goes:
   - Debezium: the span of the snapshot's Kafka timestamps (first to last record);
   - the projector: a fresh deployment applying the finished topic, read models off;
   - the read models: built by the projector's backfill over that replica.
4. The replica is checked against Postgres (`projector verify`: counts and hashed ranges).

The target (issue: "Throughput where users wait"): the projector and the read models are never
the bound, each stage's own rate at least twice Debezium's.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from projector.config import client_environment

SCHEMA, TABLE = "bench_load", "wide"
# A connector name of its own each run: Kafka Connect keeps a deleted connector's offsets, and a
# connector re-created under the same name would resume from them instead of snapshotting.
CONNECTOR, PREFIX = f"bench-load-{uuid.uuid4().hex[:8]}", "bload"
SLOT, PUBLICATION = "bench_load_slot", "bench_load_pub"
TOPIC = f"{PREFIX}.{SCHEMA}.{TABLE}"
DDL = f"""
CREATE TABLE {SCHEMA}.{TABLE} (
    id bigint PRIMARY KEY, customer int NOT NULL, category text NOT NULL, name varchar(64),
    price numeric(12, 2), qty int, weight double precision, ratio real, active boolean,
    born date, created_at timestamptz, updated timestamp, ref uuid, attrs jsonb, code char(8),
    rank smallint)
"""
FILL = f"""
INSERT INTO {SCHEMA}.{TABLE}
SELECT i, i %% 100000, 'cat' || (i %% 50), 'item ' || i, (i %% 10000) / 100.0 + 1, i %% 17 + 1,
       i * 0.25, (i %% 1000) / 7.0, i %% 3 = 0, date '2020-01-01' + (i %% 2000)::int,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
       timestamp '2024-01-01 00:00:00' + i * interval '1 minute', md5(i::text)::uuid,
       jsonb_build_object('k', i %% 10, 'tag', 't' || (i %% 7)), lpad((i %% 99999999)::text, 8, '0'),
       (i %% 30000)::smallint
FROM generate_series(%s::bigint, %s::bigint) AS i
"""
READ_MODELS = f"""
[[entity]]
name = "load_items"
description = "One row per item: its category, value and time."
sources = ["{TABLE}"]
key = ["id"]
keys = "SELECT id FROM {{{TABLE}}}"
sql = "SELECT id, category, price * qty AS value, created_at FROM {{{TABLE}}} WHERE id IN {{keys}}"

[entity.affects]
{TABLE} = "SELECT id FROM {{changed}}"

[[aggregate]]
name = "load_by_category"
description = "Per category: items and value."
entity = "load_items"
columns = [
  {{ name = "category", group_by = "category" }},
  {{ name = "items", sum = "1" }},
  {{ name = "value", sum = "value" }},
]
"""


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    rows: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run_initial_load_bench(
    rows: int,
    log: Any,
    report: Path | None,
    command: str,
    connector_settings: dict[str, str] | None = None,
) -> list[Stage]:
    """`connector_settings`: set on the benchmark's connector over the shipped ones (to compare
    Debezium's snapshot settings)."""
    from devstack import Stack

    stack = Stack()
    stack.up(log=log)
    env = client_environment()
    work = Path(tempfile.mkdtemp(prefix="projector-initial-load-"))
    models = work / "read_models.toml"
    models.write_text(READ_MODELS)
    try:
        _drop_connector(env)
        _fill(env, rows, log)
        stages = _measure(env, rows, work, models, log, connector_settings or {})
    finally:
        if os.environ.get("PROJECTOR_BENCH_KEEP"):  # to look at what went wrong
            log(f"kept: {work}, connector {CONNECTOR}, schema {SCHEMA}")
        else:
            _drop_connector(env)
            shutil.rmtree(work, ignore_errors=True)
    text = _report(stages, rows, command)
    log(text)
    if report is not None:
        with report.open("a") as out:
            out.write("\n" + text)
        log(f"appended to {report}")
    return stages


def _fill(env: dict[str, str], rows: int, log: Any) -> None:
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(DDL)
        step = 500_000
        for first in range(1, rows + 1, step):
            last = min(rows, first + step - 1)
            conn.execute(FILL, [first, last])
            log(f"  Postgres: {last:,}/{rows:,} rows")
        conn.execute(f"ANALYZE {SCHEMA}.{TABLE}")
        user = sql.Identifier(env.get("CDC_USER", "cdc"))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(SCHEMA), user))
        conn.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(SCHEMA, TABLE), user)
        )
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {SCHEMA}.{TABLE}")


def _connector_env(env: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "CONNECTOR_NAME": CONNECTOR,
        "TOPIC_PREFIX": PREFIX,
        "SLOT_NAME": SLOT,
        "PUBLICATION_NAME": PUBLICATION,
        "CAPTURE": f"{SCHEMA}.{TABLE}",
        "EXCLUDE_COLUMNS": "",
        "MASK_COLUMNS": "",
        "ROW_FILTERS": "",
    }


def _projector_env(env: dict[str, str], chdb: Path, models: Path, maintain: bool) -> dict[str, str]:
    return {
        **env,
        "PROJECTOR_TOPIC_PREFIX": PREFIX,
        "PROJECTOR_SCHEMAS": SCHEMA,
        "PROJECTOR_TABLE_PATTERN": TABLE,
        "PROJECTOR_CHDB_PATH": str(chdb),
        "PROJECTOR_GROUP_ID": f"{PREFIX}-{uuid.uuid4().hex[:8]}",
        "PROJECTOR_PUBLICATION": PUBLICATION,
        "PUBLICATION_NAME": PUBLICATION,
        "PROJECTOR_SLOT_NAME": SLOT,
        "SLOT_NAME": SLOT,
        "PROJECTOR_MAX_BATCH_MESSAGES": "50000",
        "PROJECTOR_TRANSACTION_METADATA": "false",
        "PROJECTOR_READ_MODEL_SCHEMA": SCHEMA,
        "PROJECTOR_READ_MODELS_FILE": str(models),
        "PROJECTOR_MAINTAIN_READ_MODELS": str(maintain).lower(),
        "PROJECTOR_METRICS_PORT": "0",
    }


def _measure(
    env: dict[str, str],
    rows: int,
    work: Path,
    models: Path,
    log: Any,
    connector_settings: dict[str, str],
) -> list[Stage]:
    from connectors import ConnectClient, render_connector

    projector = str(Path(sys.executable).parent / "projector")
    client = ConnectClient(env["CONNECT_URL"])
    definition = render_connector(_connector_env(env))
    definition["config"].update(connector_settings)
    # 2. end to end: the connector and the projector start together
    first = work / "end-to-end"
    log(f"end to end: connector {CONNECTOR} snapshots {rows:,} rows, the projector applies ...")
    started = time.monotonic()
    client.put_config(definition["name"], definition["config"])
    run = _run_until(
        [projector, "run", "--until-kafka-end"],
        _projector_env(env, first, models, maintain=True),
        lambda: _topic_end(env) >= rows,
        log,
    )
    end_to_end = time.monotonic() - started
    first_ts, last_ts = _timestamp_span(env)
    debezium = Stage("Debezium snapshot (Kafka timestamps)", (last_ts - first_ts) / 1000, rows)
    _check_counts(first, rows, run)
    verified = subprocess.run(
        [projector, "verify", f"{SCHEMA}.{TABLE}", "--json"],
        env=_projector_env(env, first, models, maintain=True),
        capture_output=True,
        text=True,
    )
    if verified.returncode != 0:
        raise RuntimeError(
            f"the replica differs from Postgres:\n{verified.stdout[-4000:]}\n{verified.stderr[-2000:]}"
        )
    log("  replica verified equal to Postgres")
    # 3. the projector alone, over the finished topic, read models off
    log("the projector alone (a fresh deployment over the finished topic, read models off) ...")
    second = work / "projector-alone"
    started = time.monotonic()
    subprocess.run(
        [projector, "run", "--until-kafka-end"],
        env=_projector_env(env, second, models, maintain=False),
        check=True,
        capture_output=True,
    )
    alone = time.monotonic() - started
    log("the read models alone (the backfill over that replica) ...")
    models_alone = _backfill_seconds(second, models)
    return [
        Stage(
            "end to end (connector created → replica and read models hold every row)",
            end_to_end,
            rows,
        ),
        debezium,
        Stage("projector alone (process start to exit, read models off)", alone, rows),
        Stage("read models alone (backfill over the replica)", models_alone, rows),
    ]


def _run_until(command: list[str], env: dict[str, str], ready: Any, log: Any) -> str:
    """Run `projector run --until-kafka-end` again until the topic holds every row when the run
    starts (a run ends at the end it saw first); the last run's log."""
    output = ""
    while True:
        complete = ready()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"projector run failed:\n{done.stderr[-3000:]}")
        output = done.stderr
        log(f"  Kafka holds {_topic_end(env):,} rows of the snapshot so far")
        if complete:
            return output


def _topic_end(env: dict[str, str]) -> int:
    consumer = Consumer({"bootstrap.servers": env["KAFKA_BOOTSTRAP"], "group.id": "bench-probe"})
    try:
        if TOPIC not in consumer.list_topics(timeout=10).topics:
            return 0
        return int(consumer.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)[1])
    finally:
        consumer.close()


def _timestamp_span(env: dict[str, str]) -> tuple[int, int]:
    """Kafka timestamps (ms) of the topic's first and last record."""
    consumer = Consumer(
        {
            "bootstrap.servers": env["KAFKA_BOOTSTRAP"],
            "group.id": f"bench-span-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
        }
    )
    try:
        end = _topic_end(env)
        stamps = []
        for offset in (0, end - 1):
            consumer.assign([TopicPartition(TOPIC, 0, offset)])
            message = None
            while message is None or message.error():
                message = consumer.poll(10)
            stamps.append(message.timestamp()[1])
        return stamps[0], stamps[1]
    finally:
        consumer.close()


def _check_counts(chdb: Path, rows: int, log_text: str) -> None:
    from projector.clickhouse import ChdbBackend

    ch = ChdbBackend(str(chdb))
    try:
        replica = ch.rows(f"SELECT count() AS n FROM replica_{SCHEMA}.{TABLE} FINAL")[0]["n"]
        items = ch.rows("SELECT count() AS n FROM read_models.load_items")[0]["n"]
        groups = ch.rows("SELECT sum(items) AS n FROM read_models.load_by_category")[0]["n"]
    finally:
        ch.close()
    if not int(replica) == int(items) == int(groups) == rows:
        raise RuntimeError(
            f"after the run: replica {replica}, load_items {items}, load_by_category {groups}, "
            f"expected {rows}:\n{log_text[-2000:]}"
        )


def _backfill_seconds(chdb: Path, models: Path) -> float:
    from projector.clickhouse import ChdbBackend
    from projector.read_models.definitions import load_definitions
    from projector.read_models.maintenance import ReadModelMaintainer

    ch = ChdbBackend(str(chdb))
    try:
        maintainer = ReadModelMaintainer(
            ch, load_definitions(models), SCHEMA, f"replica_{SCHEMA}", "read_models", "projector"
        )
        started = time.monotonic()
        maintainer.family_versions.ensure()
        while maintainer.building:
            maintainer.backfill_step()
        return time.monotonic() - started
    finally:
        ch.close()


def _drop_connector(env: dict[str, str]) -> None:
    """The bench's connector, slot, publication, table and topic gone (idempotent)."""
    from confluent_kafka.admin import AdminClient

    from connectors import ConnectClient

    client = ConnectClient(env["CONNECT_URL"])
    ours = [c for c in client.connectors() if c.startswith("bench-load")]
    for name in ours:
        client.delete(name)
    if ours:
        time.sleep(2)  # the task lets go of the slot
    with psycopg.connect(env["ADMIN_DSN"], autocommit=True) as conn:
        for _ in range(30):
            active = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
            ).fetchall()
            if not active or not active[0][0]:
                break
            time.sleep(1)
        if conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
        ).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
        conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    admin = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]})
    doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{PREFIX}.")]
    if doomed:
        for future in admin.delete_topics(doomed).values():
            try:
                future.result(30)
            except Exception:
                pass
        time.sleep(2)


def _report(stages: list[Stage], rows: int, command: str) -> str:
    debezium = next(s for s in stages if s.name.startswith("Debezium"))
    lines = [
        f"### Initial load, {rows:,} rows x 16 columns ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}` on {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}; chDB, fast path, batches of 50,000.",
        "",
        "| stage | seconds | rows/s | x Debezium's rate |",
        "|---|---:|---:|---:|",
    ]
    for stage in stages:
        lines.append(
            f"| {stage.name} | {stage.seconds:.1f} | {stage.rate:,.0f} | "
            f"{stage.rate / debezium.rate if debezium.rate else 0:.2f} |"
        )
    own = [s for s in stages if "alone" in s.name]
    bound = min([debezium, *own], key=lambda s: s.rate)
    lines += [
        "",
        f"The bound is {bound.name.split(' (')[0]}; target: every other stage >= 2 x Debezium's "
        f"rate ({'met' if all(s.rate >= 2 * debezium.rate for s in own) else 'not met'}).",
        "",
    ]
    return "\n".join(lines)
