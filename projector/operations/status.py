"""`projector status`: every projection on one line, and the source side.

A **projection** is a replica table (one per captured source table) or a read model. Its line:

| field | replica table | read model |
|---|---|---|
| state | `live`, or `stopped` (topic guard, docs/projector.md) | `live`, `building n%` (first version), `rebuilding n%` (a new version beside the serving one), `failed` |
| watermark, age | newest transaction on the table applied in full, and how long ago Postgres committed it | the same over the read model's source tables |
| lag | its topic's partitions: events not yet applied (and seconds, from a running projector) | the sum (and maximum) over its sources |
| dead letters, last error | its topic's letters not replayed, the newest one's reason (or why it stopped) | over its sources, or why its version failed |

Two ways to read it. From a running projector's metrics endpoint when one answers
(`collect_live_status`: lag in offsets and seconds, events applied, watermarks); with a ClickHouse
server it then also reads ClickHouse for states, watermark ages and dead letters. Else from
ClickHouse itself (`collect_status`: checkpoints against Kafka's end offsets) — with chDB only while
no projector holds the data directory. The **source side** — the replication slot (active, WAL it
retains, a warning above `wal_retained_warning_bytes`) and the connector with its tasks — is read
from Postgres and Kafka Connect directly, either way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from projector import kafka
from projector.commit.checkpoint import PROJECTION, CheckpointStore
from projector.commit.consistency import ConsistencyTracker, capped
from projector.commit.dead_letters import DeadLetterStore
from projector.commit.ledger import TransactionLedger
from projector.commit.transactions import lsn_text
from projector.config import ProjectorConfig, client_environment, open_backend
from projector.errors import ProjectorError
from projector.operations.pauses import TablePauses
from projector.read_models.definitions import load_read_models
from projector.read_models.stage import read_ceilings
from projector.redaction import redact_values
from projector.replicas.topic_guard import TopicGuard


def collect_status(
    config: ProjectorConfig, lag_seconds: Mapping[tuple[str, int], float | None] | None = None
) -> dict[str, Any]:
    """The report from ClickHouse and Kafka (no projector needed); `lag_seconds` per partition
    from a running projector, when one answers."""
    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    dlq = DeadLetterStore(ch, config.control_database, PROJECTION)
    ledger = TransactionLedger(ch, config.control_database, PROJECTION)
    guard = TopicGuard(ch, config.control_database, PROJECTION, lambda _: None)
    pauses = TablePauses(ch, config.control_database)
    for store in (checkpoints, dlq, ledger, guard, pauses):
        store.create()  # an empty deployment reports zeros, not an error
    consumer = kafka.consumer(config.kafka_bootstrap, f"projector-status-{uuid.uuid4()}")
    partitions: list[dict[str, Any]] = []
    try:
        for (topic, partition), checkpoint in sorted(checkpoints.load().items()):
            try:
                _, end = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10, cached=False
                )
            except KafkaException as exc:
                raise ProjectorError(f"Kafka at {config.kafka_bootstrap}: {exc}") from exc
            applied_through = checkpoint.resume_offset - 1
            partitions.append(
                {
                    "topic": topic,
                    "partition": partition,
                    "applied_through": applied_through,
                    "end": end,
                    "lag": max(0, end - applied_through - 1),
                    "lag_seconds": (lag_seconds or {}).get((topic, partition)),
                }
            )
    finally:
        consumer.close()
    sources = read_model_sources(config)
    tables = sorted({t for p in partitions if (t := _table_of(config, p["topic"]))})
    tracker = ConsistencyTracker(ledger, {**sources, **{t: [t] for t in tables}})
    marks = tracker.refresh()
    if config.maintain_read_models:  # a read model stands where its stage has followed its sources
        ceilings = read_ceilings(ch, config.control_database)
        for name, collections in sources.items():
            marks[name] = capped(marks[name], ceilings.get(name), ledger, collections)
    now_ms = time.time() * 1000
    watermarks = {
        name: None
        if not mark.watermark
        else {
            "tx_id": mark.watermark.tx_id,
            "lsn": mark.watermark.lsn_text,
            "age_s": round((now_ms - mark.commit_ms) / 1000, 1) if mark.commit_ms else None,
        }
        for name, mark in marks.items()
    }
    read_models = {
        name: {"sources": collections, "watermark": watermarks.get(name)}
        for name, collections in sources.items()
    }
    paused = pauses.honoured() | pauses.wanted()
    report: dict[str, Any] = {
        "source": "clickhouse",
        "partitions": partitions,
        "read_models": read_models,
        "dead_letters": dlq.count(),
        "paused_tables": sorted(paused),
    }
    report["projections"] = projection_rows(
        config,
        partitions,
        watermarks,
        dlq.by_topic(),
        guard.stopped_topics(),
        _read_model_states(config, ch),
        paused,
    )
    return report


def collect_live_status(port: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The running projector's metrics as a status report; None when nothing answers."""
    return collect_live_status_at(f"http://127.0.0.1:{port}/metrics", timeout_s)


def collect_live_status_at(url: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The same, from a projector's metrics at `url` (another host, another container)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url, timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    partitions: dict[tuple[str, int], dict[str, Any]] = {}
    tables: list[dict[str, Any]] = []
    batches: dict[str, dict[str, float]] = {}
    read_models: dict[str, Any] = {}
    dead = 0
    dead_by_topic: dict[str, tuple[int, str]] = {}
    paused = []
    for sample in samples:
        labels, value = sample.labels, sample.value
        if sample.name.startswith("projector_consumer_lag_"):
            row = partitions.setdefault(
                (labels["topic"], int(labels["partition"])),
                {"topic": labels["topic"], "partition": int(labels["partition"])},
            )
            row["lag" if sample.name.endswith("offsets") else "lag_seconds"] = value
        elif sample.name == "projector_events_applied_total":
            tables.append({"table": labels["table"], "path": labels["path"], "events": int(value)})
        elif sample.name in ("projector_batch_seconds_count", "projector_batch_seconds_sum"):
            kind = "batches" if sample.name.endswith("count") else "seconds"
            batches.setdefault(labels["path"], {})[kind] = value
        elif sample.name == "projector_table_paused" and value:
            paused.append(labels["table"])
        elif sample.name == "projector_dead_letters_total":
            dead += int(value)
            dead_by_topic[labels["topic"]] = (int(value), "")
        elif sample.name == "projector_watermark_lsn":
            read_models[labels["read_model"]] = {
                "watermark": {"tx_id": None, "lsn": lsn_text(int(value))}
            }
    for row in partitions.values():
        row["lag"] = int(row.get("lag", 0))
    return {
        "source": url,
        "partitions": [partitions[k] for k in sorted(partitions)],
        "tables": tables,
        "batches": batches,
        "read_models": read_models,
        "dead_letters": dead,
        "dead_letters_by_topic": dead_by_topic,  # since the process started
        "paused_tables": sorted(paused),
    }


def status_report(config: ProjectorConfig) -> dict[str, Any]:
    """What `projector status` shows (module docstring): projections and the source side."""
    live = collect_live_status(config.metrics_port) if config.metrics_port else None
    report: dict[str, Any] | None = None
    if live is None or config.backend == "server":  # ClickHouse answers (beside a projector)
        seconds = {
            (p["topic"], p["partition"]): p.get("lag_seconds")
            for p in (live or {}).get("partitions", [])
        }
        try:
            stored = collect_status(config, seconds)
        except ProjectorError:
            if live is None:
                raise
        else:
            report = stored if live is None else {**live, "projections": stored["projections"]}
    if report is None and live is not None:
        marks = {name: model["watermark"] for name, model in live["read_models"].items()}
        dead = live["dead_letters_by_topic"]
        report = {
            **live,
            "projections": projection_rows(
                config, live["partitions"], marks, dead, {}, None, set(live["paused_tables"])
            ),
        }
    assert report is not None
    env = client_environment()
    report["source_side"] = {
        "replication_slot": unreachable_or(
            lambda: replication_slot(env, config.wal_retained_warning_bytes)
        ),
        "connector": unreachable_or(lambda: connector_state(env)),
    }
    # URLs with `user:password@` (Kafka Connect, the metrics endpoint) and errors quoting them
    # are printed and served: one redaction on the way out.
    return redact_values(report)


def projection_rows(
    config: ProjectorConfig,
    partitions: list[dict[str, Any]],
    watermarks: Mapping[str, dict[str, Any] | None],
    dead_letters: Mapping[str, tuple[int, str]],
    stopped: Mapping[str, str],
    model_states: Mapping[str, tuple[str, str]] | None,
    paused: Collection[str] = (),
) -> list[dict[str, Any]]:
    """One line per replica table, then per read model (module docstring). `model_states`: per
    read model its state and error (None: not known here, shown as `live`); `paused`: the tables
    (SCHEMA.TABLE) `projector pause` holds back."""
    by_table: dict[str, dict[str, Any]] = {}
    for p in partitions:
        table = _table_of(config, p["topic"])
        if table is None:
            continue
        row = by_table.setdefault(
            table,
            {
                "name": table,
                "kind": "replica",
                "topic": p["topic"],
                "state": "stopped"
                if p["topic"] in stopped
                else "paused"
                if table in paused
                else "live",
                "lag_events": 0,
                "lag_seconds": None,
                "dead_letters": dead_letters.get(p["topic"], (0, ""))[0],
                "last_error": stopped.get(p["topic"]) or dead_letters.get(p["topic"], (0, ""))[1],
            },
        )
        row["lag_events"] += int(p.get("lag") or 0)
        if p.get("lag_seconds") is not None:
            row["lag_seconds"] = max(row["lag_seconds"] or 0.0, float(p["lag_seconds"]))
    rows = [by_table[t] for t in sorted(by_table)]
    for name, sources in read_model_sources(config).items():
        feeding = [by_table[s] for s in sources if s in by_table]
        # Unknown here (views, or a running projector's metrics): live; known but never
        # recorded: the projector has not created it yet.
        unknown = ("live", "") if model_states is None else ("not built", "")
        state, error = (model_states or {}).get(name, unknown)
        seconds = [r["lag_seconds"] for r in feeding if r["lag_seconds"] is not None]
        rows.append(
            {
                "name": name,
                "kind": "read model",
                "state": state,
                "lag_events": sum(r["lag_events"] for r in feeding),
                "lag_seconds": max(seconds) if seconds else None,
                "dead_letters": sum(r["dead_letters"] for r in feeding),
                "last_error": error
                or next((r["last_error"] for r in feeding if r["last_error"]), ""),
            }
        )
    for row in rows:
        mark = watermarks.get(row["name"])
        row["watermark_lsn"] = mark["lsn"] if mark else None
        row["watermark_age_s"] = mark.get("age_s") if mark else None
    return rows


def _table_of(config: ProjectorConfig, topic: str) -> str | None:
    """`schema.table` of a table topic; None for the transaction topic and foreign topics."""
    prefix = f"{config.topic_prefix}."
    if topic == config.transaction_topic or not topic.startswith(prefix):
        return None
    return topic[len(prefix) :]


def read_model_sources(config: ProjectorConfig) -> dict[str, list[str]]:
    """Per read model, its source tables as `schema.table` (what its watermark waits for)."""
    return {
        model.name: [f"{config.read_model_schema}.{source}" for source in model.sources]
        for model in load_read_models(config.read_models_file)
    }


def _read_model_states(config: ProjectorConfig, ch: Any) -> dict[str, tuple[str, str]] | None:
    """Per read model: `live`, `building n%`, `rebuilding n%` or `failed`, and the error."""
    from projector.read_models.maintenance import maintainer_for
    from projector.read_models.versions import BUILDING, FAILED, SERVING

    maintainer = maintainer_for(config, ch)
    if maintainer is None:
        return None  # this configuration keeps no read models: they are views, always live
    maintainer.family_versions.ensure_known()
    versions = maintainer.family_versions.versions()
    states: dict[str, tuple[str, str]] = {}
    for name in {model for version in versions for model in version["models"]}:
        mine = [v for v in versions if name in v["models"]]
        serving = any(v["state"] == SERVING for v in mine)
        building = [v for v in mine if v["state"] == BUILDING]
        errors = [v["error"] for v in mine if v["state"] == FAILED and v["error"]]
        if building:
            done, total = building[-1]["done_steps"], building[-1]["steps"]
            percent = 100 * done // total if total else 0
            state = f"{'rebuilding' if serving else 'building'} {percent}%"
        else:
            state = "live" if serving else "failed" if errors else "not built"
        states[name] = (state, errors[-1] if errors else "")
    return states


def replication_slot(env: Mapping[str, str], warn_bytes: int) -> dict[str, Any]:
    """The connector's replication slot in Postgres (`ADMIN_DSN`): active, and the WAL it keeps."""
    import psycopg

    dsn = env.get("ADMIN_DSN")
    if not dsn:
        return {"state": "unknown", "note": "ADMIN_DSN is not set"}
    name = env.get("SLOT_NAME") or "projector_slot"
    with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
        row = conn.execute(
            "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            [name],
        ).fetchone()
    if row is None:
        return {
            "name": name,
            "state": "missing",
            "healthy": False,
            "note": "no such slot: the connector is not running or was deleted",
        }
    active, retained, unconfirmed = row
    over = retained is not None and retained > warn_bytes
    return {
        "name": name,
        "state": "active" if active else "inactive",
        "retained_wal_bytes": retained,
        "unconfirmed_bytes": unconfirmed,
        "warning": (
            f"retains {format_bytes(retained)} of WAL, over {format_bytes(warn_bytes)}: "
            "Postgres cannot recycle it while the connector lags or is stopped"
            if over
            else ""
        ),
        "healthy": bool(active) and not over,
    }


def connector_state(env: Mapping[str, str]) -> dict[str, Any]:
    """The Debezium connector and its tasks, from Kafka Connect (`CONNECT_URL`)."""
    from connectors import ConnectClient, failure_summary

    url = env.get("CONNECT_URL")
    if not url:
        return {"state": "unknown", "note": "CONNECT_URL is not set"}
    name = env.get("CONNECTOR_NAME") or "pg-source"
    status = ConnectClient(url, timeout_s=3).status(name)
    tasks = [t["state"] for t in status.get("tasks", [])]
    state = status["connector"]["state"]
    healthy = state == "RUNNING" and tasks and all(t == "RUNNING" for t in tasks)
    traces = [t["trace"] for t in status.get("tasks", []) if t.get("trace")]
    trace = status["connector"].get("trace") or (traces[0] if traces else "")
    failure = {"failure": failure_summary(trace)} if trace else {}
    return {"name": name, "state": state, "tasks": tasks, "healthy": bool(healthy), **failure}


def unreachable_or(read: Callable[[], Any]) -> Any:
    """One source's answer, or why it could not be read (a status never fails on one)."""
    try:
        return read()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return {"state": "unreachable", "error": (text[0] if text else type(exc).__name__)[:300]}


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
