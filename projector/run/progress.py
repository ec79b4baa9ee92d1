"""How far a running member has applied: per partition, the next offset to apply (its own, and
the other members' from their checkpoints), and the finish line's view of the run
(projector/commit/finish_line.py, `Progress`).
"""

from __future__ import annotations

from collections.abc import Mapping

from confluent_kafka import Consumer, TopicPartition

from projector.commit.checkpoint import CheckpointStore
from projector.commit.ledger import TransactionLedger, Unfinished
from projector.config import ProjectorConfig
from projector.run.partitions import PartitionState

Key = tuple[str, int]


class RunProgress:
    """The positions of a run. `next_offset` and `partitions` are the loop's own (read, never
    changed here)."""

    def __init__(
        self,
        config: ProjectorConfig,
        consumer: Consumer,
        next_offset: Mapping[Key, int],
        partitions: Mapping[Key, PartitionState],
        checkpoints: CheckpointStore,
        ledger: TransactionLedger,
    ) -> None:
        self.config, self.consumer, self.checkpoints, self.ledger = (
            config,
            consumer,
            checkpoints,
            ledger,
        )
        self.next_offset, self.partitions = next_offset, partitions

    def applied_to(self, partitions: list[Key]) -> dict[Key, int | None]:
        """Per partition, the next offset to apply: everything before it is applied. Ours from
        this process (call with no batch in flight), the others' from their checkpoints, read
        afresh (the checkpoint table, not the group's offsets, is the truth: step B)."""
        applied: dict[tuple[str, int], int | None] = {}
        theirs = []
        for topic, partition in partitions:
            next_offset = self.next_offset.get((topic, partition))
            if next_offset is None:
                theirs.append((topic, partition))
                continue
            state = self.partitions.get((topic, partition))
            if state is None or not state.buffer:
                # Nothing consumed waits to be applied: the consumer's position is past what
                # Kafka skipped (gaps at the end: transaction markers, compaction) too.
                (position,) = self.consumer.position([TopicPartition(topic, partition)])
                next_offset = max(next_offset, position.offset)
            applied[(topic, partition)] = next_offset
        checkpoints = self.checkpoints.load(theirs) if theirs else {}
        for key in theirs:
            checkpoint = checkpoints.get(key)
            applied[key] = None if checkpoint is None else checkpoint.resume_offset
        return applied

    def end_offsets(self) -> dict[Key, int]:
        """End offsets of every subscribed partition, from fresh metadata (a topic created a
        moment ago counts)."""
        ends = {}
        for topic, topic_metadata in self.consumer.list_topics(timeout=10).topics.items():
            if not self.config.subscribes_to(topic):
                continue
            for partition in topic_metadata.partitions:
                tp = TopicPartition(topic, partition)
                _, high = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                if high > 0:
                    ends[(topic, partition)] = high
        return ends

    def fence_offset(self, lsn: int) -> int | None:
        return self.ledger.fence_offset(lsn)

    def unfinished(self, fence_offset: int) -> Unfinished | None:
        return self.ledger.unfinished(
            fence_offset, self.config.topic_pattern(), self.config.topic_prefix
        )
