"""`projector status`: where the projector stands.

From a running projector's metrics endpoint when one answers (`collect_live_status`: events applied
per table and path, batch latency, lag in offsets and seconds, dead letters, watermarks), else from
ClickHouse itself (`collect_status`: checkpoints against Kafka's end offsets, read-model watermarks,
DLQ size) — with chDB only while no projector holds the data directory.
"""

from __future__ import annotations

import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from projector.checkpoint import PROJECTION, CheckpointStore
from projector.config import ProjectorConfig, open_backend
from projector.dlq import DeadLetterStore
from projector.errors import ProjectorError
from projector.rebuild import TablePauses
from projector.transactions import TransactionLedger, lsn_text
from queries.read_models import load_read_models


def collect_status(config: ProjectorConfig) -> dict[str, Any]:
    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    dlq = DeadLetterStore(ch, config.control_database, PROJECTION)
    ledger = TransactionLedger(ch, config.control_database, PROJECTION)
    pauses = TablePauses(ch, config.control_database)
    for store in (checkpoints, dlq, ledger, pauses):
        store.create()  # an empty deployment reports zeros, not an error
    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap,
                         "group.id": f"projector-status-{uuid.uuid4()}"})  # fmt: skip
    partitions = []
    try:
        for (topic, partition), checkpoint in sorted(checkpoints.load().items()):
            try:
                _, end = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10, cached=False
                )
            except KafkaException as exc:
                raise ProjectorError(f"Kafka at {config.kafka_bootstrap}: {exc}") from exc
            applied_through = checkpoint.resume_offset - 1
            partitions.append({
                "topic": topic, "partition": partition, "applied_through": applied_through,
                "end": end, "lag": max(0, end - applied_through - 1),
            })  # fmt: skip
    finally:
        consumer.close()
    read_models = {}
    for model in load_read_models(config.read_models_file):
        collections = [f"{config.read_model_schema}.{source}" for source in model.sources]
        mark = ledger.watermark(collections)
        read_models[model.name] = {
            "sources": collections,
            "watermark": None if mark is None else {"tx_id": mark.tx_id, "lsn": mark.lsn_text},
        }
    return {
        "source": "clickhouse",
        "partitions": partitions,
        "read_models": read_models,
        "dead_letters": dlq.count(),
        "paused_tables": sorted(pauses.honoured() | pauses.wanted()),
    }


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
        "paused_tables": sorted(paused),
    }
