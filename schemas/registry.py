"""Schema ids → parsed Avro writer schemas, fetched once from a Confluent-API registry."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from schemas.envelope import schema_id_of
from schemas.errors import RegistryUnavailable, UnknownSchema


@dataclass(frozen=True)
class WriterSchema:
    schema_id: int
    raw: dict[str, Any]  # the JSON schema as registered (keeps connect.* properties)
    parsed: Any  # fastavro's parsed form, for decoding


class SchemaCache:
    def __init__(self, registry_url: str) -> None:
        self.client = SchemaRegistryClient({"url": registry_url})
        self._by_id: dict[int, WriterSchema] = {}

    def get(self, schema_id: int) -> WriterSchema:
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise UnknownSchema(f"schema id {schema_id} is not in the registry") from exc
            raise RegistryUnavailable(f"registry error for schema id {schema_id}: {exc}") from exc
        except Exception as exc:  # connection refused, timeouts
            raise RegistryUnavailable(
                f"registry unreachable fetching schema id {schema_id}: {exc}"
            ) from exc
        raw = json.loads(schema.schema_str or "null")
        writer = WriterSchema(schema_id, raw, fastavro.parse_schema(raw, _write_hint=False))
        self._by_id[schema_id] = writer
        return writer

    def decode(self, payload: bytes) -> tuple[WriterSchema, Any]:
        """(writer schema, decoded datum) of a Confluent-framed message."""
        writer = self.get(schema_id_of(payload))
        datum = fastavro.schemaless_reader(io.BytesIO(payload[5:]), writer.parsed, None)
        return writer, datum
