"""The run loop's read-ahead (projector/run/in_flight.py): a batch whose predecessor failed is not
started, and the consumer is read slice by slice, each slice handed over before the next call."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from projector.commit.checkpoint import BatchRange
from projector.errors import PartitionLost, StatementRejected
from projector.run.in_flight import CONSUME_SLICE, NotApplied, after, consume_slices

BATCH = BatchRange("cdc.shop.orders", 0, 100, 199)


def done(result: BatchRange | None = None, failure: BaseException | None = None) -> Future[Any]:
    future: Future[Any] = Future()
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)
    return future


def test_a_batch_after_a_failed_one_is_not_started_and_says_so_down_the_line() -> None:
    started: list[str] = []

    def commit() -> BatchRange:
        started.append("applied")
        return BATCH

    failed = done(failure=StatementRejected("Code: 439. DB::Exception: cannot schedule a task"))
    with pytest.raises(NotApplied, match="a batch before it failed"):
        after(failed, commit)
    with pytest.raises(NotApplied):  # the one after it as well: NotApplied is a failure too
        after(done(failure=NotApplied("not applied")), commit)
    assert started == []


def test_a_batch_after_one_the_fence_refused_or_after_success_runs() -> None:
    """The fence's refusal refuses the same partition's later batches by their claim
    (BatchCommitter.commit); another partition's batch goes on."""
    refused = done(failure=PartitionLost("cdc.shop.lines", 0, "ours", "theirs"))
    assert after(refused, lambda: BATCH) == BATCH
    assert after(done(BATCH), lambda: BATCH) == BATCH
    assert after(None, lambda: BATCH) == BATCH


class Consumer:
    """Hands out `available` messages, at most as many as asked per call; records the calls."""

    def __init__(self, available: int) -> None:
        self.available = available
        self.calls: list[tuple[int, float]] = []

    def consume(self, asked: int, timeout: float) -> list[int]:
        self.calls.append((asked, timeout))
        given = min(asked, self.available)
        self.available -= given
        return list(range(given))


def test_slices_are_handed_over_one_by_one_until_one_comes_short() -> None:
    consumer = Consumer(available=2 * CONSUME_SLICE + 7)
    slices = consume_slices(consumer, 10 * CONSUME_SLICE, 0.05)  # type: ignore[arg-type]
    first = next(slices)
    assert len(first) == CONSUME_SLICE and consumer.calls == [(CONSUME_SLICE, 0.05)]  # lazily
    rest = list(slices)
    assert [len(s) for s in rest] == [CONSUME_SLICE, 7]
    assert [t for _, t in consumer.calls] == [0.05, 0.0, 0.0]  # only the first call waits


def test_slices_stop_at_what_was_wanted() -> None:
    consumer = Consumer(available=10 * CONSUME_SLICE)
    got = list(consume_slices(consumer, CONSUME_SLICE + 10, 0.05))  # type: ignore[arg-type]
    assert [len(s) for s in got] == [CONSUME_SLICE, 10]
    assert consumer.calls[-1] == (10, 0.0)
