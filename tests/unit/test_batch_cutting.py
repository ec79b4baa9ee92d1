"""Cutting a partition's consumed messages into batches (`cut_batch`,
projector/commit/checkpoint.py): full batches, draining, and an open intent cut exactly again."""

from __future__ import annotations

from projector.commit.checkpoint import BatchRange, cut_batch
from projector.errors import IntentGone


def cut(
    buffer: list[int], replay: BatchRange | None = None, size: int = 3, drain: bool = False
) -> tuple[list[int], list[int]]:
    batch, rest = cut_batch(buffer, lambda m: m, replay, size, drain)
    return list(batch), list(rest)


def test_a_full_batch_is_cut_and_a_partial_one_waits_unless_draining() -> None:
    assert cut([1, 2, 3, 4]) == ([1, 2, 3], [4])
    assert cut([4]) == ([], [4])
    assert cut([4], drain=True) == ([4], [])
    assert cut([], drain=True) == ([], [])


def test_an_open_intent_is_cut_exactly_again_over_gaps() -> None:
    intent = BatchRange("t", 0, 10, 20)
    assert cut([10, 12], intent, drain=True) == ([], [10, 12])  # not yet at its last offset
    assert cut([10, 12, 20, 21, 22], intent, size=2) == ([10, 12, 20], [21, 22])
    assert cut([10, 15, 21], intent) == ([10, 15], [21])  # offset 20 compacted away


def test_an_open_intent_whose_first_offset_kafka_lost_is_named_not_waited_for() -> None:
    """Retention removed the intent's first messages while the projector was away: the consumer
    starts where Kafka now begins. Waiting for the exact range would stall the member silently;
    cutting a shorter range would break the replay's tokens. It stops with the remedy."""
    intent = BatchRange("cdc.shop.orders", 2, 10, 20)
    for buffer in ([14, 15, 21], [25, 26]):  # inside the range, or past it
        try:
            cut(buffer, intent, drain=True)
        except IntentGone as gone:
            text = str(gone)
            assert "cdc.shop.orders[2]: the open intent 10-20" in text
            assert f"now starts at {buffer[0]}" in text
            assert f"projector reset shop.orders --to-offset {buffer[0]} --partition 2" in text
            assert "projector rebuild shop.orders --from snapshot" in text
        else:
            raise AssertionError(f"{buffer}: no IntentGone")
    assert cut([10, 15, 21], intent) == ([10, 15], [21])  # its first offset there: replayed
