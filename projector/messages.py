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
        self._columns: tuple[list[int], list[bytes | None], list[bytes | None]] | None = None
        self._key_schema_ids: set[int] | None = None

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
        """Offsets, keys and values, made once (when the batch is planned, off the applying
        thread) and kept: every later reader of the batch takes the same lists."""
        if self._columns is None:
            ms = self._messages
            self._columns = (
                [m.offset() for m in ms],
                [m.key() for m in ms],
                [m.value() for m in ms],
            )
        return self._columns

    def key_schema_ids(self) -> set[int]:
        """The registry ids of the Confluent-framed keys (made once, like `columns`)."""
        if self._key_schema_ids is None:
            keys = self.columns()[1]
            self._key_schema_ids = {
                int.from_bytes(k[1:5], "big") for k in keys if k and len(k) >= 5 and k[0] == 0
            }
        return self._key_schema_ids


def message_columns(
    messages: Sequence[RawMessage],
) -> tuple[list[int], list[bytes | None], list[bytes | None]]:
    """Offsets, keys and values of a batch, as three lists."""
    if isinstance(messages, KafkaMessages):
        return messages.columns()
    return [m.offset for m in messages], [m.key for m in messages], [m.value for m in messages]
