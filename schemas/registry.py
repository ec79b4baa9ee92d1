"""The Confluent wire format, and schema ids → parsed Avro writer schemas from the registry.

A message is byte 0 = magic 0, bytes 1-4 = the schema id (big endian), then an Avro datum.
Schemas are fetched by id with `confluent_kafka.schema_registry` (once each, then cached) and
data are read with fastavro. Only `GET /schemas/ids/{id}` is used: the client's deserializer
classes also query newer endpoints (subject associations) that a Confluent-compatible registry
need not serve, and every request has a timeout so a stalled registry is an error, not a hang.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fastavro

from projector.redaction import redact
from schemas.errors import NotConfluentFramed, RegistryUnavailable, UnknownSchema

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

MAGIC_BYTE = 0
REQUEST_TIMEOUT_S = 10


def schema_id_of(payload: bytes) -> int:
    """The registry id in a Confluent-framed message."""
    if len(payload) < 5 or payload[0] != MAGIC_BYTE:
        raise NotConfluentFramed(
            f"not a Confluent-framed Avro message (first bytes {payload[:5]!r})"
        )
    return int(struct.unpack(">I", payload[1:5])[0])


@dataclass(frozen=True)
class WriterSchema:
    schema_id: int
    raw: dict[str, Any]  # the JSON schema as registered (keeps connect.* properties)
    parsed: Any  # fastavro's parsed form, for decoding


class SchemaCache:
    def __init__(self, registry_url: str) -> None:
        # Imported here: the registry client pulls in an HTTP/crypto stack (about a second of CPU
        # on this box, measured) that every command importing this package would pay at start-up,
        # though only those that decode messages use it.
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.client: SchemaRegistryClient = SchemaRegistryClient(
            {"url": registry_url, "timeout": REQUEST_TIMEOUT_S}
        )
        self.where = redact(registry_url)  # for errors: the address, never its password
        self._by_id: dict[int, WriterSchema] = {}
        self._previous: dict[int, WriterSchema | None] = {}

    def get(self, schema_id: int) -> WriterSchema:
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise UnknownSchema(f"unknown schema id {schema_id}: not in the registry") from exc
            raise RegistryUnavailable(
                f"registry {self.where}: error for schema id {schema_id}: {exc}"
            ) from exc
        except Exception as exc:  # connection refused, timeouts
            raise RegistryUnavailable(
                f"registry {self.where} unreachable fetching schema id {schema_id}: {exc}"
            ) from exc
        raw = json.loads(schema.schema_str or "null")
        writer = WriterSchema(schema_id, raw, fastavro.parse_schema(raw, _write_hint=False))
        self._by_id[schema_id] = writer
        return writer

    def previous_version(self, subject: str, writer: WriterSchema) -> WriterSchema | None:
        """The schema registered under `subject` just before `writer` (None: it is the first)."""
        if writer.schema_id in self._previous:
            return self._previous[writer.schema_id]
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            versions = sorted(self.client.get_versions(subject))
            ids = {v: self.client.get_version(subject, v).schema_id for v in versions}
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return None
            raise RegistryUnavailable(
                f"registry {self.where}: error listing {subject}: {exc}"
            ) from exc
        except Exception as exc:
            raise RegistryUnavailable(
                f"registry {self.where} unreachable listing {subject}: {exc}"
            ) from exc
        mine = [v for v, schema_id in ids.items() if schema_id == writer.schema_id]
        earlier = [v for v in versions if mine and v < mine[0]]
        previous_id = ids[earlier[-1]] if earlier else None
        previous = None if previous_id is None else self.get(previous_id)
        self._previous[writer.schema_id] = previous
        return previous

    def decode(self, payload: bytes) -> tuple[WriterSchema, Any]:
        """(writer schema, decoded datum) of a Confluent-framed message."""
        writer = self.get(schema_id_of(payload))
        datum = fastavro.schemaless_reader(io.BytesIO(payload[5:]), writer.parsed, None)
        return writer, datum
