"""A change event as the per-message path reads it (`decode`), and what applying a batch
came to (`BatchOutcome`: events applied, dead letters, the transactions' spans counted)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from projector.commit.dead_letters import DeadLetter
from projector.commit.transactions import EventPlace, EventSpan
from projector.errors import PoisonMessage
from projector.messages import RawMessage
from schemas.errors import NotConfluentFramed, RegistryUnavailable, SchemaError, UnknownSchema
from schemas.registry import SchemaCache, WriterSchema, schema_id_of


@dataclass
class Event:
    message: RawMessage
    value: dict[str, Any]
    schema: WriterSchema
    key_schema: WriterSchema | None


@dataclass
class BatchOutcome:
    applied: int
    dead: list[DeadLetter]
    # Applied events per (Postgres xid, schema.table), with their LSNs: the watermark's input.
    transactions: dict[tuple[str, str], EventSpan] = field(default_factory=dict)
    # Dead-lettered events whose transaction is known (they were decoded): settled for
    # `--until-caught-up`, never applied for the watermark.
    dead_transactions: dict[tuple[str, str], EventSpan] = field(default_factory=dict)
    fast: bool = False  # applied by the fast path
    stop: str | None = None  # why the table must stop after this batch (the snapshot sweep's)

    def count_transaction(self, place: EventPlace, collection: str) -> None:
        """One more applied event, at `place` in its transaction, on `schema.table`."""
        xid, span = place.span()
        self.count_span(self.transactions, (xid, collection), span)

    def count_dead_letter(self, place: EventPlace, collection: str) -> None:
        """One more dead-lettered event, at `place` in its transaction, on `schema.table`."""
        xid, span = place.span()
        self.count_span(self.dead_transactions, (xid, collection), span)

    @staticmethod
    def count_span(
        counts: dict[tuple[str, str], EventSpan], key: tuple[str, str], span: EventSpan
    ) -> None:
        counts[key] = counts[key] + span if key in counts else span

    def merge(self, other: BatchOutcome) -> None:
        """Add the outcome of another part of the same batch."""
        self.applied += other.applied
        self.dead += other.dead
        for key, span in other.transactions.items():
            self.count_span(self.transactions, key, span)
        for key, span in other.dead_transactions.items():
            self.count_span(self.dead_transactions, key, span)


def transaction_fields(value_schema: Mapping[str, Any]) -> list[str] | None:
    """The field names of an envelope schema's `transaction` block (Debezium's `id`,
    `total_order`, `data_collection_order`), None when the envelope has none."""
    for envelope_field in value_schema.get("fields", []):
        if envelope_field["name"] != "transaction":
            continue
        kind = envelope_field["type"]
        types = kind if isinstance(kind, list) else [kind]
        for kind in types:
            if isinstance(kind, dict) and kind.get("type") == "record":
                return [f["name"] for f in kind.get("fields", [])]
        return []
    return None


def decode(message: RawMessage, schemas: SchemaCache) -> Event | None:
    """The decoded event, None for a tombstone; PoisonMessage when it cannot be read."""
    if message.value is None:
        return None
    try:
        schema, value = schemas.decode(message.value)  # the value first: its error says more
        # The key's schema names the key columns; its datum is decoded only when the value lacks
        # the key (`_key_image`): the before-image of a delete normally carries it.
        key_schema = None if message.key is None else schemas.get(schema_id_of(message.key))
    except RegistryUnavailable:
        raise  # transient: the caller retries the whole batch
    except UnknownSchema as exc:
        raise PoisonMessage("schema", str(exc)) from exc
    except (NotConfluentFramed, SchemaError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise PoisonMessage("decode", f"undecodable Avro: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, dict) or "op" not in value:
        raise PoisonMessage("decode", "not a Debezium envelope (no 'op' field)")
    return Event(message, value, schema, key_schema)
