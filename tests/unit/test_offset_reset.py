"""The pure parts of `projector reset`: where a partition moves, the plan it shows, and which
re-read offsets the transaction ledger counted already."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from projector.commit.checkpoint import RESET, PartitionCheckpoint, counted_ranges, counted_run
from projector.errors import ResetRefused
from projector.operations.offset_reset import parse_time, plan, resolve_target

T = "cdc.shop.orders"


def test_an_offset_inside_the_retained_range_is_the_target() -> None:
    assert resolve_target(T, 0, 100, 250, to_offset=100) == 100
    assert resolve_target(T, 0, 100, 250, to_offset=250) == 250  # the end: skip everything


@pytest.mark.parametrize("offset", [99, 251, -1])
def test_an_offset_outside_the_retained_range_names_the_range(offset: int) -> None:
    with pytest.raises(
        ResetRefused, match=r"outside what Kafka retains of cdc.shop.orders\[0\]: 100 to 250"
    ):
        resolve_target(T, 0, 100, 250, to_offset=offset)


def test_a_time_moves_to_the_first_offset_at_or_after_it_and_after_the_last_to_the_end() -> None:
    assert resolve_target(T, 0, 0, 250, when_ms=1_000, found=42) == 42
    assert resolve_target(T, 0, 0, 250, when_ms=1_000, found=-1) == 250


def test_a_time_before_what_retention_kept_is_refused_with_the_earliest_message() -> None:
    with pytest.raises(
        ResetRefused, match=r"before what Kafka retains .*\(offset 100\) is from 1970"
    ):
        resolve_target(T, 0, 100, 250, when_ms=1_000, found=100, earliest_ms=5_000)
    # nothing deleted (low 0), or the earliest kept message is older than the time: fine
    assert resolve_target(T, 0, 0, 250, when_ms=1_000, found=0, earliest_ms=5_000) == 0
    assert resolve_target(T, 0, 100, 250, when_ms=9_000, found=100, earliest_ms=5_000) == 100


def test_times_are_iso_8601_and_utc_without_a_zone() -> None:
    assert parse_time("2025-05-01T12:00:00Z") == datetime(2025, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2025-05-01 12:00") == datetime(2025, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2025-05-01T14:00:00+02:00") == datetime(2025, 5, 1, 12, tzinfo=UTC)
    with pytest.raises(ResetRefused, match="not an ISO-8601 time"):
        parse_time("yesterday")


def test_the_plan_counts_replayed_and_skipped_events_and_warns_only_forward() -> None:
    back = plan("shop.orders", T, {0: (0, 300), 1: (0, 300)}, {0: 250, 1: None}, {0: 200, 1: 0})
    assert [(m.current, m.replayed, m.skipped) for m in back.moves] == [(250, 50, 0), (0, 0, 0)]
    assert not back.forward
    assert not any("WARNING" in line for line in back.lines())
    assert "partition 0: offset 250 -> 200  re-reads 50 event(s)" in back.lines()[1]

    forward = plan("shop.orders", T, {0: (0, 300)}, {0: 250}, {0: 280})
    assert forward.forward and forward.moves[0].skipped == 30
    text = "\n".join(forward.lines())
    assert "SKIPS 30 event(s)" in text and "WARNING: moving forward skips 30" in text
    assert "--to-offset <old>` (old offsets: 0: 250)" in text


def test_a_reset_checkpoint_resumes_at_its_offset() -> None:
    assert PartitionCheckpoint(RESET, 200, 199).resume_offset == 200
    assert PartitionCheckpoint(RESET, 0, -1).resume_offset == 0


def test_counted_ranges_follow_the_resets() -> None:
    assert counted_ranges([]) == []
    # applied to 500, back to 100: 0-500 counted
    assert counted_ranges([(500, 100)]) == [(0, 500)]
    # ... then, at 300 (re-reading), back to 0 again: still 0-500
    assert counted_ranges([(500, 100), (300, 0)]) == [(0, 500)]
    # forward from 100 to 1000 (100-999 never applied), then at 1500 back to 50
    assert counted_ranges([(100, 1000), (1500, 50)]) == [(0, 100), (1000, 1500)]
    # a reset of a partition that had applied nothing
    assert counted_ranges([(0, 0)]) == []


def test_counted_run_says_where_a_batch_must_end() -> None:
    ranges = [(0, 100), (1000, 1500)]
    assert counted_run(ranges, 0) == (True, 100)
    assert counted_run(ranges, 99) == (True, 100)
    assert counted_run(ranges, 100) == (False, 1000)
    assert counted_run(ranges, 1200) == (True, 1500)
    assert counted_run(ranges, 1500) == (False, None)
    assert counted_run([], 7) == (False, None)
