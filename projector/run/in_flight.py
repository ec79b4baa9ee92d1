"""The run loop's read-ahead: which batches are handed to the apply thread, and when.

The loop (projector/run/loop.py) consumes, cuts and plans batches on the main thread and hands
them to one apply thread, which commits them in the order they were handed over. The rules:

- **At most `READ_AHEAD_BATCHES` (2) in flight**: one applying, the next planned and waiting,
  so ClickHouse never waits for the main thread to consume, cut and plan during a backlog (chDB
  and the HTTP client release the GIL while ClickHouse works). More would buy nothing with one
  apply thread, and each holds a batch of messages in memory.
- **Only a full batch waits behind one applying.** A partial batch (the buffers hold less than a
  batch: live traffic) is cut only when none applies: queued, it would wait as long, and pay a
  batch's fixed cost (the commit protocol's statements) again. Meanwhile the loop consumes with
  a short wait (`PARTIAL_BATCH_WAIT_S`), so the partial batch goes as soon as the apply thread
  is free, with what came in the meantime.
- **A batch is committed under the claim it was cut under** (`BatchCommitter.commit(…, claim)`,
  projector/commit/checkpoint.py): after the fence refuses a batch, the loop waits until none is
  in flight and claims the partition again; a batch cut before that re-claim is refused too, so
  the partition resumes from its checkpoint, never past the refused batch.
- **A batch whose predecessor failed is not started** (`after`): otherwise the next batch of the
  same partition, already handed over, would be applied past the failed one's offsets.
- **Consumed in slices** of `CONSUME_SLICE` messages: librdkafka holds the GIL while it makes a
  call's messages, and the apply thread needs it between its ClickHouse statements (one call for
  a whole batch made every small statement of the apply thread wait ~15 ms longer).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from confluent_kafka import Consumer

from projector.commit.checkpoint import BatchRange
from projector.errors import PartitionLost

READ_AHEAD_BATCHES = 2
PARTIAL_BATCH_WAIT_S = 0.005  # the consume wait while a partial batch waits for one applying
CONSUME_SLICE = 1_000  # messages per consume call


class BatchesInFlight:
    """The batches handed to the apply thread, oldest first (it commits them in this order)."""

    def __init__(self) -> None:
        self._futures: deque[Future[BatchRange]] = deque()

    def __len__(self) -> int:
        return len(self._futures)

    def add(self, future: Future[BatchRange]) -> None:
        self._futures.append(future)

    def newest(self) -> Future[BatchRange] | None:
        return self._futures[-1] if self._futures else None

    def applying(self) -> bool:
        """Whether one is not done yet."""
        return any(not future.done() for future in self._futures)

    def oldest_done(self) -> bool:
        return bool(self._futures) and self._futures[0].done()

    def take_oldest(self) -> Future[BatchRange]:
        return self._futures.popleft()

    def beyond(self, keep: int) -> list[Future[BatchRange]]:
        """The oldest ones, all but the newest `keep`: those to be done before `keep` remain."""
        return list(self._futures)[: max(0, len(self._futures) - keep)]


def consume_slices(consumer: Consumer, wanted: int, timeout_s: float) -> Iterator[list[Any]]:
    """Up to `wanted` messages, slice by slice while full slices come (waiting up to `timeout_s`
    for the first). Each slice is handed over before the next is asked for: the caller buffers
    it before a rebalance served inside the next call can move its partition."""
    got, wait_s = 0, timeout_s
    while got < wanted:
        asked = min(wanted - got, CONSUME_SLICE)
        messages: list[Any] = consumer.consume(asked, wait_s)
        yield messages
        got, wait_s = got + len(messages), 0.0
        if len(messages) < asked:
            return


class NotApplied(Exception):
    """A batch the apply thread did not start: one handed over before it failed (`after`)."""


def after(previous: Future[BatchRange] | None, commit: Callable[[], BatchRange]) -> BatchRange:
    """`commit()` on the apply thread, unless the batch handed over before it failed otherwise
    than by the fence (a batch refused by the fence refuses its partition's later ones itself:
    they carry its claim). The apply thread takes batches in order, so `previous` is done here;
    without this, a batch whose predecessor of the same partition failed before its intent
    (retries given up at a stop, a statement refused) would be applied past it, and the
    predecessor's offsets skipped for good."""
    if previous is not None:
        failure = previous.exception()
        if failure is not None and not isinstance(failure, PartitionLost):
            raise NotApplied(f"not applied: a batch before it failed ({failure})")
    return commit()
