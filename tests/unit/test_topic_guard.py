"""When offsets stop being versions (projector/replicas/topic_guard.py): the three cases, and what is not
one of them."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from projector.clickhouse import ChdbBackend
from projector.replicas.topic_guard import (
    NO_KEY_SCHEMA,
    TopicGuard,
    TopicIdentity,
    TopicShape,
    broken_versions,
)

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


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(str(tmp_path_factory.mktemp("chdb")))
    yield backend
    backend.close()


@pytest.mark.parametrize("kafka_says", [TopicShape("id-9", 1), None])
def test_a_table_stopped_by_another_check_stays_stopped_and_is_not_taken_for_re_created(
    engine: ChdbBackend, kafka_says: TopicShape | None
) -> None:
    """The snapshot sweep stops a table through the guard (`stop`), maybe before any identity of
    its topic was recorded (Kafka did not describe it then): the stop must not make the topic look
    re-created later (which rewinds its partitions to offset 0)."""
    shape: list[TopicShape | None] = [kafka_says]
    database = f"guard_{id(shape)}"
    engine.execute(f"CREATE DATABASE {database}")
    guard = TopicGuard(engine, database, "replica", lambda topic: shape[0])
    guard.create()
    reason = guard.stop(TOPIC, "a snapshot bound does not decode")
    assert reason.startswith("a snapshot bound does not decode; the table is stopped")
    assert "projector table reset public.orders" in reason
    shape[0] = TopicShape("id-9", 1)
    fresh = TopicGuard(engine, database, "replica", lambda topic: shape[0])
    assert fresh.stopped_reason(TOPIC, {7}) == reason  # every member sees it
    assert not fresh.recreated(TOPIC)
