"""Errors about message shapes and schemas."""


class SchemaError(ValueError):
    """A message or schema does not have the shape the projector expects."""


class NotConfluentFramed(SchemaError):
    """The bytes do not start with the Confluent magic byte and a 4-byte schema id."""


class UnknownSchema(SchemaError):
    """The registry does not know the schema id a message carries."""


class RegistryUnavailable(RuntimeError):
    """The registry cannot be reached right now (transient: retried)."""
