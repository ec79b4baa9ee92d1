"""Shapes of change events: the Confluent wire format and registry access, the Avro → ClickHouse
type map, and declared upcasters."""

from schemas.errors import NotConfluentFramed, RegistryUnavailable, SchemaError, UnknownSchema
from schemas.registry import SchemaCache, WriterSchema, schema_id_of

__all__ = [
    "NotConfluentFramed",
    "RegistryUnavailable",
    "SchemaCache",
    "SchemaError",
    "UnknownSchema",
    "WriterSchema",
    "schema_id_of",
]
