"""The rebuild's partition reader, against the real Kafka: chunks cut and prepared ahead on its
thread while the caller works; a range that is not such a chunk is answered message by message;
a chunk asked for after the partition's end was met, once more messages came, still gets every
one of them; a transactional topic's gaps (commit markers) end a range; a replay of an earlier
range reads it again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from projector.operations.read_ahead import PartitionReader, ReadChunk
from tests.integration.conftest import StackHandle


def produce(bootstrap: str, topic: str, values: range, transactional: bool = False) -> None:
    config = {"bootstrap.servers": bootstrap}
    if transactional:
        config["transactional.id"] = f"reader-test-{uuid.uuid4()}"
    producer = Producer(config)
    if transactional:
        producer.init_transactions()
        producer.begin_transaction()
    for value in values:
        producer.produce(topic, str(value).encode(), partition=0)
    if transactional:
        producer.commit_transaction()
    producer.flush()


def prepare(messages: list[Any]) -> tuple[int, int]:
    """What the reader's thread makes of a chunk: here its first and last value."""
    return int(messages[0].value()), int(messages[-1].value())


@pytest.fixture
def reader(stack: StackHandle) -> Iterator[PartitionReader]:
    topic = f"reader-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            "bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"],
            "group.id": f"reader-{topic}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    reader = PartitionReader(consumer, topic, 0, chunk=30, prepare=prepare)
    yield reader
    reader.close()


def values(chunk: ReadChunk) -> list[int]:
    return [int(m.value()) for m in chunk.messages]


def settled(reader: PartitionReader) -> None:
    """Give the reading thread time to read and prepare ahead."""
    time.sleep(1.0)


def test_chunks_prepared_ahead_ranges_and_an_end_met_before(
    stack: StackHandle, reader: PartitionReader
) -> None:
    bootstrap = stack.env["KAFKA_BOOTSTRAP"]
    produce(bootstrap, reader.topic, range(100))
    first = reader.read(0, 30)
    assert values(first) == list(range(30))
    settled(reader)
    second = reader.read(30, 60)  # cut and prepared while the caller was away
    assert values(second) == list(range(30, 60))
    assert second.prepared == (30, 59)
    partial = reader.read(60, 75)  # not a chunk: message by message, nothing prepared
    assert values(partial) == list(range(60, 75)) and partial.prepared is None
    settled(reader)
    assert values(reader.read(75, 100)) == list(range(75, 100))  # the partition ends at 100

    # The thread met the end (100); a chunk past it is asked for before its messages exist.
    with ThreadPoolExecutor(1) as pool:
        chunk = pool.submit(reader.read, 100, 130)
        time.sleep(1.0)
        assert not chunk.done()  # it waits for them
        produce(bootstrap, reader.topic, range(100, 150))
        got = chunk.result(30)
        assert values(got) == list(range(100, 130))
    assert values(reader.read(130, 150)) == list(range(130, 150))

    # A replay of an earlier range (after a failure) starts the reading afresh.
    replay = reader.read(30, 60)
    assert values(replay) == list(range(30, 60))
    settled(reader)
    again = reader.read(60, 90)
    assert values(again) == list(range(60, 90)) and again.prepared == (60, 89)


def test_a_range_ending_in_a_commit_marker_is_complete(
    stack: StackHandle, reader: PartitionReader
) -> None:
    produce(stack.env["KAFKA_BOOTSTRAP"], reader.topic, range(10), transactional=True)
    # offsets 0-9 are the messages, 10 the transaction's commit marker (never delivered)
    assert values(reader.read(0, 11, timeout_s=20)) == list(range(10))
