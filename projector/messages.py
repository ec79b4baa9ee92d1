"""Kafka messages as the projector keeps them between consuming and applying."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, overload


class RawMessage(NamedTuple):
    """One Kafka message as the projector keeps it (a tuple: cheap to make a million of)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0  # Kafka's timestamp: when Kafka Connect produced it


class KafkaMessages(Sequence[RawMessage]):
    """confluent-kafka messages seen as `RawMessage`s, each made only when asked for: the fast
    path reads offsets, keys and values as columns and never needs one (a million tuples cost a
    second)."""

    def __init__(self, messages: Sequence[Any]) -> None:
        self._messages = messages

    def __len__(self) -> int:
        return len(self._messages)

    @overload
    def __getitem__(self, index: int) -> RawMessage: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[RawMessage]: ...

    def __getitem__(self, index: int | slice) -> RawMessage | Sequence[RawMessage]:
        if isinstance(index, slice):
            return KafkaMessages(self._messages[index])
        m = self._messages[index]
        return RawMessage(
            m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]
        )

    def __iter__(self) -> Iterator[RawMessage]:
        return (self[i] for i in range(len(self._messages)))

    def columns(self) -> tuple[list[int], list[bytes | None], list[bytes | None]]:
        ms = self._messages
        return [m.offset() for m in ms], [m.key() for m in ms], [m.value() for m in ms]


def message_columns(
    messages: Sequence[RawMessage],
) -> tuple[list[int], list[bytes | None], list[bytes | None]]:
    """Offsets, keys and values of a batch, as three lists."""
    if isinstance(messages, KafkaMessages):
        return messages.columns()
    return [m.offset for m in messages], [m.key for m in messages], [m.value for m in messages]
