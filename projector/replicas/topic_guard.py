"""Versions survive what happens to topics: the checks that stop a table whose `_version`s would no
longer be ordered.

`_version` is the event's Kafka offset (the argument is at the top of projector/replicas/catalog.py). That
orders the events of one key only while all of them sit in one partition of one topic. Three
things break it; each is detected per topic against what was recorded when the projector first
applied a batch of it (`projector.topic_identities`, shared by every member of the group):

| what happened | seen as | why the versions break |
|---|---|---|
| the topic was deleted and re-created | Kafka's topic id differs | offsets restart at 0: a new event is older than the stored rows and loses to them under `FINAL` |
| the topic's partition count changed | the partition count differs | a key's partition is its key bytes' hash modulo the count: keys move, and offsets of two partitions do not order one key's events |
| the key schema changed (a topic of several partitions) | a message key's Confluent schema id differs | the schema id is part of the key bytes Kafka hashes: the key moves partition |

A table whose topic shows one of these is **stopped**: the reason is recorded (every member sees
it within `REFRESH_S`), and every later message of the table is dead-lettered with it (stage
`topic`), while the other tables go on. Rows applied between the change and its detection do not
matter: the remedy replaces the table. The remedy is a rebuild of that one table
(`projector table reset S.T`, `reset`): drop the replica, start every partition of the topic at
its end now (older events of a moved key would outrank its newer ones), forget the identity, and
ask Debezium for an incremental snapshot of the table, whose reads then come after everything
skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.commit.checkpoint import CheckpointStore
from projector.replicas.snapshot_sweep import SnapshotSweep

REFRESH_S = 5.0  # how stale a member's view of the recorded identities and of Kafka may be
NO_KEY_SCHEMA = -1


@dataclass(frozen=True)
class TopicShape:
    """What Kafka says of a topic now."""

    topic_id: str
    partitions: int


@dataclass(frozen=True)
class TopicIdentity:
    """What the projector recorded of a topic when it first applied it, and whether it stopped."""

    topic_id: str
    partitions: int
    key_schema_id: int = NO_KEY_SCHEMA  # until a keyed message is seen
    stopped: str = ""  # the reason, when the table is stopped


def remedy(topic: str) -> str:
    table = ".".join(topic.split(".")[-2:])
    return (
        f"the table is stopped (its messages go to the DLQ): rebuild it with "
        f"`projector table reset {table}` (docs/troubleshooting.md)"
    )


def broken_versions(
    topic: str, recorded: TopicIdentity, now: TopicShape, key_schema_ids: set[int]
) -> str | None:
    """Why the offsets of `topic` no longer order its keys' events (the table above), or None."""
    if now.topic_id != recorded.topic_id:
        return (
            f"topic {topic} was deleted and re-created (topic id {recorded.topic_id} → "
            f"{now.topic_id}): its offsets, the replica's versions, started again at 0"
        )
    if now.partitions != recorded.partitions:
        return (
            f"topic {topic} went from {recorded.partitions} to {now.partitions} partitions: keys "
            "move partition, and offsets of two partitions do not order one key's events"
        )
    known = {recorded.key_schema_id} - {NO_KEY_SCHEMA}
    moved = key_schema_ids - known if known else set()
    if now.partitions > 1 and moved:
        return (
            f"the key schema of topic {topic} changed (schema id {recorded.key_schema_id} → "
            f"{max(moved)}), and with "
            f"it the key bytes that choose a key's partition among {now.partitions}"
        )
    return None


class TopicGuard:
    def __init__(
        self,
        ch: ClickHouse,
        database: str,
        projection: str,
        describe: Callable[[str], TopicShape | None],
    ) -> None:
        self.ch = ch
        self.table = f"{ident(database)}.topic_identities"
        self.projection = projection
        self.describe = describe
        self._recorded: dict[str, tuple[float, TopicIdentity | None]] = {}
        self._shapes: dict[str, tuple[float, TopicShape | None]] = {}

    def create(self) -> None:
        self.ch.execute(
            self.ch.topology.create_table(
                self.table,
                [
                    "`projection` String",
                    "topic String",
                    "topic_id String",
                    "partitions UInt32",
                    "key_schema_id Int64",
                    "stopped String",
                    "version UInt64",
                ],
                "ReplacingMergeTree",
                "version",
                "(`projection`, topic)",
                deduplicate=False,
            )
        )

    def stopped_reason(self, topic: str, key_schema_ids: Iterable[int]) -> str | None:
        """None when a batch of `topic` with these key schema ids may be applied; else why its
        table is stopped (recorded the first time), with the remedy."""
        keys = set(key_schema_ids)
        recorded = self.recorded(topic)
        if recorded is not None and recorded.stopped:
            return recorded.stopped
        now = self.shape(topic)
        if now is None:
            return None  # Kafka does not describe it right now: the next batch checks again
        if recorded is None:  # the first batch: what the topic is now is what it must stay
            recorded = TopicIdentity(now.topic_id, now.partitions, min(keys, default=NO_KEY_SCHEMA))
            self._record(topic, recorded)
        reason = broken_versions(topic, recorded, now, keys)
        if reason is not None:
            stopped = f"{reason}; {remedy(topic)}"
            self._record(
                topic,
                TopicIdentity(
                    recorded.topic_id, recorded.partitions, recorded.key_schema_id, stopped
                ),
            )
            return stopped
        if recorded.key_schema_id == NO_KEY_SCHEMA and keys:
            self._record(topic, TopicIdentity(recorded.topic_id, recorded.partitions, min(keys)))
        return None

    def stop(self, topic: str, reason: str) -> str:
        """Stop `topic`'s table for `reason` (another check's: the snapshot sweep's); the
        reason recorded, with the remedy, is returned."""
        recorded = self.recorded(topic, fresh=True)
        if recorded is None:  # as Kafka describes it now (else: nothing to compare, recreated())
            now = self.shape(topic, fresh=True)
            recorded = TopicIdentity(now.topic_id if now else "", now.partitions if now else 0)
        stopped = f"{reason}; {remedy(topic)}"
        identity = TopicIdentity(
            recorded.topic_id, recorded.partitions, recorded.key_schema_id, stopped
        )
        self._record(topic, identity)
        return stopped

    def stopped_topics(self) -> dict[str, str]:
        """Every stopped table's topic with the reason (for `projector status`)."""
        rows = self.ch.rows(
            f"SELECT topic, stopped FROM {self.table} FINAL "
            f"WHERE `projection` = {quote(self.projection)} AND stopped != ''"
        )
        return {row["topic"]: row["stopped"] for row in rows}

    def recreated(self, topic: str) -> bool:
        """Kafka's topic id differs from the recorded one (checked at assignment: the
        checkpoints of the old topic mean nothing for the new one)."""
        recorded, now = self.recorded(topic, fresh=True), self.shape(topic, fresh=True)
        return bool(recorded and recorded.topic_id and now and now.topic_id != recorded.topic_id)

    def recorded(self, topic: str, fresh: bool = False) -> TopicIdentity | None:
        cached = self._recorded.get(topic)
        if cached is None or fresh or time.monotonic() - cached[0] > REFRESH_S:
            rows = self.ch.rows(
                f"SELECT topic_id, partitions, key_schema_id, stopped FROM {self.table} FINAL "
                f"WHERE `projection` = {quote(self.projection)} AND topic = {quote(topic)}"
            )
            identity = (
                TopicIdentity(
                    rows[0]["topic_id"],
                    int(rows[0]["partitions"]),
                    int(rows[0]["key_schema_id"]),
                    rows[0]["stopped"],
                )
                if rows
                else None
            )
            cached = (time.monotonic(), identity)
            self._recorded[topic] = cached
        return cached[1]

    def shape(self, topic: str, fresh: bool = False) -> TopicShape | None:
        cached = self._shapes.get(topic)
        if cached is None or fresh or time.monotonic() - cached[0] > REFRESH_S:
            cached = (time.monotonic(), self.describe(topic))
            self._shapes[topic] = cached
        return cached[1]

    def partition_count(self, topic: str) -> int | None:
        """The topic's partition count as recorded at its first batch (a changed count stops
        the table before any batch applies), else as Kafka describes it now."""
        recorded = self.recorded(topic)
        if recorded is not None:
            return recorded.partitions
        shape = self.shape(topic)
        return None if shape is None else shape.partitions

    def _record(self, topic: str, identity: TopicIdentity) -> None:
        row = {
            "projection": self.projection,
            "topic": topic,
            "topic_id": identity.topic_id,
            "partitions": identity.partitions,
            "key_schema_id": identity.key_schema_id,
            "stopped": identity.stopped,
            "version": time.time_ns(),
        }
        self.ch.execute(insert_statement(self.table, list(row), [row], token=""))
        self._recorded[topic] = (time.monotonic(), identity)

    def forget(self, topic: str) -> None:
        """The rebuild's step: the next batch records the topic afresh."""
        self.ch.execute(
            f"DELETE FROM {self.table} WHERE `projection` = {quote(self.projection)} "
            f"AND topic = {quote(topic)}"
        )
        self._recorded.pop(topic, None)


def reset_table(
    ch: ClickHouse,
    guard: TopicGuard,
    checkpoints: CheckpointStore,
    replica: str,
    topic: str,
    ends: dict[int, int],
    sweep: SnapshotSweep,
) -> None:
    """The rebuild of a stopped table, its ClickHouse part (the module docstring): drop the
    replica `replica`, resume every partition of `topic` at its end offset in `ends` (read now),
    forget the topic's identity and the snapshot bounds recorded of it (offsets it will not
    apply again: projector/replicas/snapshot_sweep.py). The caller then asks Debezium for a snapshot of
    the table. Run it with no projector running (a running member keeps its positions)."""
    ch.execute(f"DROP TABLE IF EXISTS {replica}{ch.topology.on_cluster()}")
    checkpoints.restart_at(topic, ends, member="projector table reset")
    guard.forget(topic)
    sweep.forget(topic)
