"""`projector status`: checkpoints against Kafka's end offsets, read-model watermarks, DLQ size."""

from __future__ import annotations

import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from projector.checkpoint import CheckpointStore
from projector.clickhouse import open_backend
from projector.config import ProjectorConfig
from projector.dlq import DeadLetterStore
from projector.errors import ProjectorError
from projector.runner import PROJECTION
from projector.transactions import TransactionLedger
from queries.read_models import load_read_models


def collect_status(config: ProjectorConfig) -> dict[str, Any]:
    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    dlq = DeadLetterStore(ch, config.control_database, PROJECTION)
    ledger = TransactionLedger(ch, config.control_database, PROJECTION)
    for store in (checkpoints, dlq, ledger):
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
    return {"partitions": partitions, "read_models": read_models, "dead_letters": dlq.count()}
