"""When offsets stop being versions (projector/replicas/topic_guard.py): the three cases, and what is not
one of them."""

from __future__ import annotations

import re

import pytest

from projector.replicas.topic_guard import NO_KEY_SCHEMA, TopicIdentity, TopicShape, broken_versions

TOPIC = "cdc.public.orders"
RECORDED = TopicIdentity("id-1", 3, key_schema_id=7)


@pytest.mark.parametrize(
    ("now", "keys", "problem"),
    [
        (TopicShape("id-2", 3), {7}, r"deleted and re-created \(topic id id-1 → id-2\)"),
        (TopicShape("id-1", 4), {7}, "went from 3 to 4 partitions"),
        (TopicShape("id-1", 1), set(), "went from 3 to 1 partitions"),
        (TopicShape("id-1", 3), {8}, r"key schema .* changed \(schema id 7 → 8\)"),
        (TopicShape("id-1", 3), {7, 9}, r"schema id 7 → 9"),
    ],
)
def test_each_change_that_reorders_a_keys_events_is_named(
    now: TopicShape, keys: set[int], problem: str
) -> None:
    reason = broken_versions(TOPIC, RECORDED, now, keys)
    assert reason is not None
    assert re.search(problem, reason), reason


@pytest.mark.parametrize(
    ("recorded", "now", "keys"),
    [
        (RECORDED, TopicShape("id-1", 3), {7}),  # nothing changed
        (RECORDED, TopicShape("id-1", 3), set()),  # truncates and tombstone-less batches
        (TopicIdentity("id-1", 1, 7), TopicShape("id-1", 1), {8}),  # one partition: no move
        (TopicIdentity("id-1", 3, NO_KEY_SCHEMA), TopicShape("id-1", 3), {8}),  # first key seen
    ],
)
def test_what_keeps_offsets_ordered_is_not_a_stop(
    recorded: TopicIdentity, now: TopicShape, keys: set[int]
) -> None:
    assert broken_versions(TOPIC, recorded, now, keys) is None
