"""Kafka in one place: the clients the engine opens, and how a topic and its table name each other.

Debezium names a table's topic `<topic prefix>.<schema>.<table>` (`topic.prefix` in
connectors/postgres-source.json); everything that turns one into the other calls
`table_topic` or `source_table_of` here.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicCollection
from confluent_kafka.admin import AdminClient

log = logging.getLogger("projector")


def table_topic(prefix: str, table: str) -> str:
    """`SCHEMA.TABLE` → the topic Debezium writes its changes to."""
    return f"{prefix}.{table}"


def source_table_of(topic: str) -> tuple[str, str]:
    """`<prefix>.<schema>.<table>` → (schema, table)."""
    parts = topic.split(".")
    return parts[-2], parts[-1]


def table_of(topic: str) -> str:
    """`<prefix>.<schema>.<table>` → `SCHEMA.TABLE`."""
    return ".".join(source_table_of(topic))


def consumer(bootstrap: str, group_id: str | None = None, **settings: Any) -> Consumer:
    """A consumer of `bootstrap`; in `group_id` when given (librdkafka's setting names, dots as
    underscores: `enable_auto_commit=False`)."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap}
    if group_id is not None:
        conf["group.id"] = group_id
    conf.update(_librdkafka(settings))
    return Consumer(conf)


def group_member(
    bootstrap: str, group_id: str, session_timeout_ms: int, max_poll_interval_ms: int
) -> Consumer:
    """`projector run`'s consumer: a member of `group_id` that commits nothing itself (the
    checkpoints in ClickHouse say where a partition resumes), reads a new partition from its
    start, reports each partition's end, and hands partitions over one by one
    (cooperative-sticky)."""
    return consumer(
        bootstrap,
        group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        enable_partition_eof=True,
        topic_metadata_refresh_interval_ms=2000,
        partition_assignment_strategy="cooperative-sticky",
        session_timeout_ms=session_timeout_ms,
        max_poll_interval_ms=max_poll_interval_ms,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )


def producer(bootstrap: str, **settings: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, **_librdkafka(settings)})


def admin(bootstrap: str, **settings: Any) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, **_librdkafka(settings)})


def _librdkafka(settings: dict[str, Any]) -> dict[str, Any]:
    return {name.replace("_", "."): value for name, value in settings.items()}


def topic_names(admin: AdminClient) -> set[str] | None:
    """Every topic Kafka has now (None: Kafka cannot say right now)."""
    try:
        return set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        log.warning("cannot list topics: %s", exc)
        return None


def describe_topic(admin: AdminClient, topic: str) -> tuple[str, int] | None:
    """Kafka's id and partition count of `topic` now (None: Kafka cannot say right now)."""
    try:
        futures = admin.describe_topics(TopicCollection([topic]), request_timeout=10)
        description = futures[topic].result(timeout=15)
    except KafkaException as exc:
        log.warning("cannot describe topic %s: %s", topic, exc)
        return None
    return str(description.topic_id), len(description.partitions)
