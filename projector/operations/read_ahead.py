"""Reading a partition ahead of the chunk being applied: `PartitionReader`.

A replica rebuild (projector/operations/replica_rebuild.py) reads each partition of a topic in
chunks while ClickHouse applies the previous one; the same reader serves any caller that applies
a partition chunk after chunk. Reading ahead changes nothing but memory and time: what is
applied, and when, is the caller's choice.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from projector.errors import RebuildRefused, SourceUnavailable


@dataclass
class ReadChunk:
    """Offsets [first, end) of a partition as read: its messages (gaps: transaction markers,
    compaction) and what `PartitionReader.prepare` made of them, when it ran."""

    first: int
    end: int
    messages: list[Any]
    prepared: Any = None


class PartitionReader:
    """One partition read chunk after chunk, ahead of the chunk being applied.

    A consumer of its own, assigned once, is read on a thread of its own: while ClickHouse
    applies a chunk (chDB and the HTTP client release the GIL), the thread fetches the next
    ones, cuts them at `first + k * chunk` (where reading started) and has `prepare` make what
    their apply needs from them (the fast path's plan), holding at most `2 * chunk` messages.

    `read(first, end)` answers a chunk made ahead when [first, end) is one; any other range (the
    live position inside the next chunk, a replay) is answered message by message, without
    `prepared`, and the cuts go on from its end. A `first` other than where the last read ended
    starts the reading afresh there. Reading ahead changes nothing but memory and time: what is
    applied, and when, is the caller's choice."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        partition: int,
        chunk: int,
        prepare: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.partition = partition
        self.chunk = max(1, chunk)
        self.prepare = prepare
        self._position: int | None = None  # where the next read is expected to start
        self._changed = threading.Condition()
        self._ready: deque[ReadChunk] = deque()  # cut and prepared, in offset order
        self._preparing: ReadChunk | None = None  # cut, being prepared (after `_ready`)
        self._buffer: deque[Any] = deque()  # consumed, not cut yet (after `_preparing`)
        self._cut_at = 0  # where the next cut begins
        self._end_seen = -1  # the highest end of the partition met (all before it consumed)
        self._failure: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def read(self, first: int, end: int, timeout_s: float = 60.0) -> ReadChunk:
        """Offsets [first, end); `prepared` is set when it is a chunk made ahead."""
        if first != self._position:
            self._start_at(first)
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self._failure is not None:
                    self._position = None
                    raise SourceUnavailable(
                        f"reading {self.topic}[{self.partition}]: {self._failure}"
                    )
                if not found:
                    if self._ready and (self._ready[0].first, self._ready[0].end) == (first, end):
                        chunk = self._ready.popleft()
                        self._changed.notify_all()  # room to read on
                        self._position = end
                        return chunk
                    coming = self._preparing or ReadChunk(
                        self._cut_at, self._cut_at + self.chunk, []
                    )
                    wait = not self._ready and (coming.first, coming.end) == (first, end)
                else:
                    wait = False
                if not wait:
                    if self._preparing is not None:
                        wait = True  # its messages come back with it
                    else:
                        self._take(first, end, found)
                        complete = self._ready or self._buffer or self._end_seen >= end
                        if complete or (found and found[-1].offset() == end - 1):
                            self._position = end
                            return ReadChunk(first, end, found)
                left = deadline - time.monotonic()
                if left <= 0:
                    self._position = None  # not where it was asked to be: start afresh next time
                    raise RebuildRefused(
                        f"could not read {self.topic}[{self.partition}] "
                        f"{first}-{end - 1} in {timeout_s:.0f} s"
                    )
                self._changed.wait(min(left, 1.0))

    def _take(self, first: int, end: int, found: list[Any]) -> None:
        """Move the messages of [first, end) into `found`, chunks made ahead undone (they do not
        fit the range asked for); cuts go on from `end`. Holding the lock."""
        undone = [m for chunk in self._ready for m in chunk.messages]
        self._ready.clear()
        self._buffer.extendleft(reversed(undone))
        buffer = self._buffer
        while buffer and buffer[0].offset() < end:
            message = buffer.popleft()
            if message.offset() >= first:
                found.append(message)
        self._cut_at = end
        self._changed.notify_all()  # room to read on

    def _start_at(self, first: int) -> None:
        self.stop()
        self.consumer.assign([TopicPartition(self.topic, self.partition, first)])
        self._ready, self._preparing, self._buffer = deque(), None, deque()
        self._cut_at, self._end_seen, self._failure, self._stopping = first, -1, None, False
        self._position = first
        self._thread = threading.Thread(
            target=self._fetch, name=f"rebuild-read-{self.topic}-{self.partition}", daemon=True
        )
        self._thread.start()

    def _held(self) -> int:
        """Messages held: consumed, cut, and being prepared (the bound of `2 * chunk`)."""
        preparing = len(self._preparing.messages) if self._preparing is not None else 0
        return len(self._buffer) + sum(len(c.messages) for c in self._ready) + preparing

    def _cut(self) -> ReadChunk | None:
        """The next chunk when every message of it is consumed (holding the lock)."""
        first, end = self._cut_at, self._cut_at + self.chunk
        buffer = self._buffer
        if not buffer or buffer[0].offset() < first:
            return None  # a read is taking messages before the cut
        if buffer[-1].offset() < end - 1 and self._end_seen < end:
            return None  # not all consumed yet
        messages = []
        while buffer and buffer[0].offset() < end:
            messages.append(buffer.popleft())
        self._cut_at = end
        return ReadChunk(first, end, messages)

    def _fetch(self) -> None:
        """The reading thread: consume, cut, prepare; at most `2 * chunk` messages held."""
        try:
            while True:
                with self._changed:
                    while self._held() >= 2 * self.chunk and not self._stopping:
                        self._changed.wait()
                    if self._stopping:
                        return
                    room = 2 * self.chunk - self._held()
                messages = self.consumer.consume(min(10_000, room), 0.5)
                with self._changed:
                    for message in messages:
                        error = message.error()
                        if error is None:
                            self._buffer.append(message)
                        elif error.code() == KafkaError._PARTITION_EOF:
                            # The end as it was when fetched: everything before it is consumed.
                            self._end_seen = max(self._end_seen, message.offset() or 0)
                        # other errors are librdkafka's to retry
                    self._preparing = self._cut()
                    self._changed.notify_all()
                while self._preparing is not None:
                    chunk = self._preparing
                    if self.prepare is not None and chunk.messages:
                        chunk.prepared = self.prepare(chunk.messages)  # outside the lock
                    with self._changed:
                        self._ready.append(chunk)
                        self._preparing = self._cut()
                        self._changed.notify_all()
        except BaseException as exc:  # handed to the next read
            with self._changed:
                self._failure, self._preparing = exc, None
                self._changed.notify_all()

    def stop(self) -> None:
        """Stop the reading thread (the consumer stays open and assigned)."""
        if self._thread is None:
            return
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self.consumer.close()
