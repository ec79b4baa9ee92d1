"""Read one topic from its first offset and decode it, until a condition holds or time runs out.

For the demo and for tests that check what Debezium wrote; the projector's own consumer is the
consumer-group loop, not this.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, TopicPartition

from tests.integration.change_events import ChangeEvent, EventDecoder


def read_topic_until(
    bootstrap: str,
    topic: str,
    decoder: EventDecoder,
    done: Callable[[list[ChangeEvent]], bool],
    timeout_s: float = 60.0,
    from_offset: int | None = None,
) -> list[ChangeEvent]:
    """From the first offset, or from `from_offset` of partition 0 (a busy topic need not be
    replayed from its start)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    if from_offset is None:
        consumer.subscribe([topic])
    else:
        consumer.assign([TopicPartition(topic, 0, from_offset)])
    events: list[ChangeEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not done(events):
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    continue  # the topic appears with its first event
                raise RuntimeError(f"reading {topic}: {error}")
            events.append(
                decoder.decode(
                    topic, msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value()
                )
            )
    finally:
        consumer.close()
    return events
