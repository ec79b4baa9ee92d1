"""Debezium change events as the projector sees them, decoded through the schema registry.

Messages use the Confluent wire format: byte 0 is the magic 0, bytes 1-4 the schema id (big
endian), the rest an Avro datum. Decoding goes through `confluent_kafka.schema_registry`, which
caches every schema it fetched by id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from schemas.errors import NotConfluentFramed

MAGIC_BYTE = 0


def schema_id_of(payload: bytes) -> int:
    """The registry id in a Confluent-framed message."""
    if len(payload) < 5 or payload[0] != MAGIC_BYTE:
        raise NotConfluentFramed(
            f"not a Confluent-framed Avro message (first bytes {payload[:5]!r})"
        )
    return int(struct.unpack(">I", payload[1:5])[0])


@dataclass(frozen=True)
class ChangeEvent:
    """One decoded message of a table topic. `value is None` marks a tombstone."""

    topic: str
    partition: int
    offset: int
    key: dict[str, Any] | None
    value: dict[str, Any] | None
    value_schema_id: int | None

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    @property
    def op(self) -> str | None:
        return None if self.value is None else self.value["op"]

    @property
    def before(self) -> dict[str, Any] | None:
        return None if self.value is None else self.value.get("before")

    @property
    def after(self) -> dict[str, Any] | None:
        return None if self.value is None else self.value.get("after")

    @property
    def source(self) -> dict[str, Any]:
        return {} if self.value is None else dict(self.value["source"])


class EventDecoder:
    """Decode keys and values of Debezium topics through a Confluent-API schema registry."""

    def __init__(self, registry_url: str) -> None:
        self.registry = SchemaRegistryClient({"url": registry_url})
        self._deserializer = AvroDeserializer(self.registry)

    def decode_part(self, topic: str, payload: bytes | None, field: MessageField) -> Any:
        if payload is None:
            return None
        return self._deserializer(payload, SerializationContext(topic, field))

    def decode(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> ChangeEvent:
        return ChangeEvent(
            topic=topic,
            partition=partition,
            offset=offset,
            key=self.decode_part(topic, key, MessageField.KEY),
            value=self.decode_part(topic, value, MessageField.VALUE),
            value_schema_id=None if value is None else schema_id_of(value),
        )
