"""Which batches the fast path takes, and how it cuts them into schema segments."""

from __future__ import annotations

from projector.replicas.catalog import TOAST_PLACEHOLDER
from projector.replicas.fast_path import plan_segments


def framed(schema_id: int, body: bytes = b"\x02ab") -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def test_segments_follow_schema_changes_and_drop_tombstones() -> None:
    offsets = [10, 11, 12, 13, 14, 15]
    keys = [framed(1), framed(1), framed(1), framed(1), framed(1), framed(9)]
    values = [
        framed(5, b"a"),
        framed(5, b"b"),
        None,
        framed(6, b"c"),
        framed(6, b"d"),
        framed(6, b"e"),
    ]
    segments = plan_segments(offsets, keys, values)
    assert segments is not None
    assert [(s.value_schema_id, s.key_schema_id, s.offsets) for s in segments] == [
        (5, 1, [10, 11]),
        (6, 1, [13, 14]),
        (6, 9, [15]),
    ]
    assert segments[1].data == framed(6, b"c") + framed(6, b"d")


def test_batches_the_fast_path_leaves_to_the_per_message_path() -> None:
    good = framed(5)
    cases = {
        "truncate (no key)": ([1], [None], [good]),
        "TOAST placeholder": ([1], [framed(1)], [framed(5, TOAST_PLACEHOLDER.encode())]),
        "value not framed": ([1], [framed(1)], [b"\x01\x00\x00\x00\x05xyz"]),
        "key not framed": ([1], [b"not avro"], [good]),
        "too short": ([1], [framed(1)], [b"\x00\x00"]),
    }
    for name, (offsets, keys, values) in cases.items():
        assert plan_segments(offsets, keys, values) is None, name


def test_a_bad_message_after_good_ones_still_sends_the_batch_down_the_per_message_path() -> None:
    offsets = [1, 2, 3]
    keys = [framed(1), framed(1), None]
    values = [framed(5), framed(5), framed(5)]
    assert plan_segments(offsets, keys, values) is None
    assert plan_segments([1, 2], [framed(1), framed(1)], [framed(5), None]) is not None
