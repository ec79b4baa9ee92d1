"""Shapes of change events: envelope decoding, registry access (and later the type map)."""

from schemas.envelope import ChangeEvent, EventDecoder, schema_id_of
from schemas.errors import NotConfluentFramed, SchemaError

__all__ = ["ChangeEvent", "EventDecoder", "NotConfluentFramed", "SchemaError", "schema_id_of"]
