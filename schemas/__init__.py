"""Shapes of change events: the wire format and registry access, the envelope, the type map."""

from schemas.envelope import ChangeEvent, EventDecoder
from schemas.errors import NotConfluentFramed, SchemaError
from schemas.registry import schema_id_of

__all__ = ["ChangeEvent", "EventDecoder", "NotConfluentFramed", "SchemaError", "schema_id_of"]
