"""What a rebuild reads from Kafka: each topic's partitions and watermarks, and its partitions
read ahead (projector/operations/read_ahead.py).

A consumer per topic answers the metadata and watermark questions; each partition read gets a
consumer of its own, assigned without a group (`projector-rebuild-<topic>` is never joined, and
nothing is committed to Kafka: a rebuild's position is its checkpoint projection's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from projector.operations.read_ahead import PartitionReader


class RebuildTopics:
    """The topics the rebuilds of this process read (the shadows' and the notification topic)."""

    def __init__(self, kafka_bootstrap: str, chunk_messages: int) -> None:
        """`chunk_messages`: the chunk a partition is read ahead in (a shadow's step)."""
        self.kafka_bootstrap = kafka_bootstrap
        self.chunk_messages = chunk_messages
        self._consumers: dict[str, Consumer] = {}
        self._readers: dict[tuple[str, int], PartitionReader] = {}
        self._partitions: dict[str, list[int]] = {}

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next message will get (empty: no such topic)."""
        consumer = self._consumer_for(topic)
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in metadata.partitions
        }

    def earliest(self, topic: str) -> dict[int, int]:
        """Per partition, the first offset Kafka still holds (empty: no such topic)."""
        consumer = self._consumer_for(topic)
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0]
            for p in metadata.partitions
        }

    def partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(self.earliest(topic))
        return self._partitions[topic]

    def _consumer_for(self, topic: str) -> Consumer:
        """A consumer for the topic's metadata and watermarks."""
        if topic not in self._consumers:
            self._consumers[topic] = self._new_consumer(topic)
        return self._consumers[topic]

    def _new_consumer(self, topic: str) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.kafka_bootstrap,
                "group.id": f"projector-rebuild-{topic}",  # assigned, never subscribed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
            }
        )

    def reader(
        self, topic: str, partition: int, prepare: Callable[[list[Any]], Any] | None = None
    ) -> PartitionReader:
        """The partition's reader; with `prepare`, chunks read ahead are prepared ahead too
        (the `prepare` of the first call stays the reader's)."""
        key = (topic, partition)
        if key not in self._readers:
            self._readers[key] = PartitionReader(
                self._new_consumer(topic), topic, partition, self.chunk_messages, prepare
            )
        return self._readers[key]

    def close_readers(self, topic: str) -> None:
        """End the reading threads of `topic`'s partitions (its rebuild failed, or ended)."""
        for key in [k for k in self._readers if k[0] == topic]:
            self._readers.pop(key).close()

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
