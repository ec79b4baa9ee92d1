"""Debezium's transactions as the ledger reads them: transaction ids and their LSNs (text and
number), where a change event sits in its transaction (`EventPlace`: counted once by its
`data_collection_order`), the spans of events a batch counts, and what the ledger hands back
(`Watermark`, `RecordedEnd`, `Unfinished`). Why these rules: projector/commit/ledger.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from projector.errors import NotAnLsn


@dataclass(frozen=True)
class Watermark:
    tx_id: str
    lsn: int
    offset: int  # of the END event on the transaction topic

    @property
    def lsn_text(self) -> str:
        return lsn_text(self.lsn)


def lsn_text(lsn: int) -> str:
    """Postgres' spelling of an LSN, e.g. 0/1A2B3C4."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """An LSN from Postgres' spelling (`pg_current_wal_lsn()`, e.g. 0/16B3748)."""
    match = _LSN_TEXT.fullmatch(text.strip())
    if match is None:
        raise NotAnLsn(
            f"{text!r} is not a Postgres LSN: expected two hexadecimal numbers like 0/16B3748, "
            "as SELECT pg_current_wal_lsn() prints it"
        )
    return int(match.group(1), 16) << 32 | int(match.group(2), 16)


@dataclass(frozen=True)
class Unfinished:
    """Transactions ended by the fence that still miss events on a projected table."""

    transactions: int
    tx_id: str  # one of them, for the log
    data_collection: str
    expected: int
    settled: int  # applied or dead-lettered


def lsn_of(tx_id: str) -> int:
    """Debezium's Postgres transaction id is `<txId>:<lsn>`."""
    _, _, lsn = tx_id.partition(":")
    return int(lsn) if lsn.isdigit() else 0


def xid_of(tx_id: str) -> str:
    """The Postgres transaction id alone. Debezium's `<txId>:<lsn>` is not one string per
    transaction: change events carry their own LSN after the colon, the END event another."""
    return tx_id.partition(":")[0]


@dataclass(frozen=True)
class EventSpan:
    """Events of one transaction on one table within one batch: who they are (their
    `data_collection_order`, module docstring "Counted once"), and the smallest and largest of
    their LSNs (what ties them to their END: module docstring, "Which END")."""

    first_lsn: int
    last_lsn: int
    orders: frozenset[int] = frozenset()  # the events' data_collection_order
    unnamed: int = 0  # events that carry no data_collection_order: counted as they come

    @property
    def events(self) -> int:
        return len(self.orders) + self.unnamed

    @classmethod
    def of(cls, tx_id: str, order: int | None = None) -> tuple[str, EventSpan]:
        """The transaction (xid) and span of one change event's Debezium transaction id and
        `data_collection_order` (None when the event has none)."""
        lsn = lsn_of(tx_id)
        if order is None:
            return xid_of(tx_id), cls(lsn, lsn, unnamed=1)
        return xid_of(tx_id), cls(lsn, lsn, frozenset((int(order),)))

    def __add__(self, other: EventSpan) -> EventSpan:
        return EventSpan(
            min(self.first_lsn, other.first_lsn),
            max(self.last_lsn, other.last_lsn),
            self.orders | other.orders,
            self.unnamed + other.unnamed,
        )


@dataclass(frozen=True)
class EventPlace:
    """Where a change event stands in its source transaction: Debezium's transaction id
    (`<xid>:<lsn>`) and its `data_collection_order` (its number among the transaction's events on
    its table, 1, 2, ...; None when the event carries none)."""

    tx_id: str
    order: int | None

    @classmethod
    def of(cls, value: Mapping[str, Any] | None) -> EventPlace | None:
        """The place of a decoded change event; None when it names no transaction."""
        block = (value or {}).get("transaction") or {}
        if not block.get("id"):
            return None
        order = block.get("data_collection_order")
        return cls(str(block["id"]), None if order is None else int(order))

    def span(self) -> tuple[str, EventSpan]:
        return EventSpan.of(self.tx_id, self.order)


# Per (xid, schema.table): the events a batch applied, or dead-lettered.
EventCounts = Mapping[tuple[str, str], EventSpan]


@dataclass(frozen=True)
class RecordedEnd:
    """One transaction's END as the ledger holds it."""

    offset: int
    tx_id: str
    lsn: int
    commit_ms: int  # Postgres commit time (Debezium's ts_ms); 0 when unknown

    def watermark(self) -> Watermark:
        return Watermark(self.tx_id, self.lsn, self.offset)
