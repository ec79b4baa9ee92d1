"""What a member keeps per partition it holds: the messages consumed and not yet in a batch,
an open intent to replay, and where a `projector reset` left what the ledger already counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import Message

from projector.commit.checkpoint import BatchRange


def offset_of(message: Message) -> int:
    """A consumed message's offset (only error events have none)."""
    offset = message.offset()
    assert offset is not None
    return offset


@dataclass
class PartitionState:
    buffer: list[Message] = field(default_factory=list)  # consumed, not yet in a batch
    replay: BatchRange | None = None  # an open intent to replay exactly
    positioned: int = 0  # times steps A-C placed it: a batch cut before the last one is stale
    high_watermark: int = 0
    # Offsets whose events the ledger counted before a `projector reset` moved the partition
    # back (checkpoint.py, R2): batches are cut at their edges and those inside count nothing.
    counted: list[tuple[int, int]] = field(default_factory=list)
