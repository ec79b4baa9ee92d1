"""Debezium change events as the projector sees them, decoded through the schema registry.

Decoding (the Confluent wire format, schemas by id from the registry) is `schemas.registry`'s job;
this module gives the decoded key and value the shape of a Debezium change event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.registry import SchemaCache, schema_id_of


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
        self.schemas = SchemaCache(registry_url)

    def decode_part(self, payload: bytes | None) -> Any:
        return None if payload is None else self.schemas.decode(payload)[1]

    def decode(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> ChangeEvent:
        return ChangeEvent(
            topic=topic,
            partition=partition,
            offset=offset,
            key=self.decode_part(key),
            value=self.decode_part(value),
            value_schema_id=None if value is None else schema_id_of(value),
        )
