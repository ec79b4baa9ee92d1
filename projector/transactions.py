"""Consistency watermarks from Debezium's transaction metadata.

With `provide.transaction.metadata`, Debezium writes a BEGIN and an END event per transaction to
`<prefix>.transaction` (one partition, commit order); the END event counts the transaction's events
per table (`data_collections`), and every change event names its transaction (`transaction.id`,
`"<txId>:<lsn>"`, of which only the txId identifies the transaction). Two ledgers in the control database, both written under the commit protocol's
deduplication tokens, so they are exact across replays:

- `transactions`: per ended transaction and table, the number of events Debezium emitted, with the
  END event's LSN (the end of the commit record) and its offset on the transaction topic;
- `transaction_progress` (SummingMergeTree): per transaction and table, the events applied, and
  the events dead-lettered (never applied: they hold the watermark, not `--until-caught-up`).

The **watermark** of a set of source tables is the newest transaction T such that every transaction
up to T (in commit order, i.e. transaction-topic offset) that touched those tables has all its events
on them applied. A read model over those tables then shows every transaction up to T completely and
none partially... among transactions Debezium has already reported as ended. A dead-lettered event
keeps its transaction incomplete: the watermark stops there, as it should.

The same ledgers tell `projector run --until-caught-up` when every change committed up to a source
LSN is applied (`fence_offset`, `unfinished`; the argument is in projector/catch_up.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from projector.checkpoint import BatchRange
from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.errors import ConfigError


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
        raise ConfigError(
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


class TransactionLedger:
    def __init__(self, ch: ClickHouse, database: str, projection: str) -> None:
        self.ch = ch
        self.ends = f"{ident(database)}.transactions"
        self.progress = f"{ident(database)}.transaction_progress"
        self.projection = projection

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(
            topology.create_table(
                self.ends,
                ["tx_id String", "lsn UInt64", "`offset` Int64", "data_collection String",
                 "expected UInt64"],
                "ReplacingMergeTree", "", "(tx_id, data_collection)",
            )
        )  # fmt: skip
        self.ch.execute(
            topology.create_table(
                self.progress,
                ["tx_id String", "data_collection String", "applied UInt64",
                 "dead_lettered UInt64"],
                "SummingMergeTree", "", "(tx_id, data_collection)",
            )
        )  # fmt: skip
        # Ledgers made before dead letters were counted (SummingMergeTree sums the new column).
        self.ch.execute(
            topology.alter_table(
                self.progress, "ADD COLUMN IF NOT EXISTS dead_lettered UInt64 DEFAULT 0"
            )
        )

    def record_ends(self, batch: BatchRange, events: list[tuple[int, dict[str, Any]]]) -> None:
        """END events of the transaction topic (offset, decoded value); BEGINs are skipped."""
        rows = [
            {"tx_id": xid_of(value["id"]), "lsn": lsn_of(value["id"]), "offset": offset,
             "data_collection": c["data_collection"], "expected": int(c["event_count"])}
            for offset, value in events if value.get("status") == "END"
            for c in value.get("data_collections") or []
        ]  # fmt: skip
        if rows:
            token = batch.token(self.projection, "transactions")
            self.ch.execute(insert_statement(self.ends, list(rows[0]), rows, token))

    def record_progress(
        self,
        batch: BatchRange,
        applied: Mapping[tuple[str, str], int],
        dead_lettered: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """Events applied and events dead-lettered by one batch, per (transaction id,
        schema.table)."""
        dead_lettered = dead_lettered or {}
        rows = [
            {"tx_id": xid_of(tx), "data_collection": collection,
             "applied": applied.get((tx, collection), 0),
             "dead_lettered": dead_lettered.get((tx, collection), 0)}
            for tx, collection in sorted({*applied, *dead_lettered})
        ]  # fmt: skip
        if rows:
            token = batch.token(self.projection, "transaction_progress")
            self.ch.execute(insert_statement(self.progress, list(rows[0]), rows, token))

    def watermark(self, collections: list[str]) -> Watermark | None:
        """The newest transaction up to which every transaction on `collections` is complete."""
        wanted = ", ".join(quote(c) for c in collections)
        rows = self.ch.rows(
            f"""SELECT e.tx_id AS tx_id, min(e.`offset`) AS off, any(e.lsn) AS lsn,
                       min(coalesce(p.applied, 0) >= e.expected) AS complete
                FROM (SELECT * FROM {self.ends} FINAL WHERE data_collection IN ({wanted})) AS e
                LEFT JOIN (SELECT tx_id, data_collection, sum(applied) AS applied
                           FROM {self.progress} WHERE data_collection IN ({wanted})
                           GROUP BY tx_id, data_collection) AS p
                  ON p.tx_id = e.tx_id AND p.data_collection = e.data_collection
                GROUP BY e.tx_id ORDER BY off"""
        )
        newest: Watermark | None = None
        for row in rows:
            if not int(row["complete"]):
                break
            newest = Watermark(row["tx_id"], int(row["lsn"]), int(row["off"]))
        return newest

    def fence_offset(self, lsn: int) -> int | None:
        """The transaction-topic offset of the first recorded END at or after source `lsn`, None
        while there is none. END events are recorded in offset order, one batch at a time, so
        every END before the fence is recorded too."""
        rows = self.ch.rows(
            f"SELECT min(`offset`) AS fence, count() AS n FROM {self.ends} WHERE lsn >= {int(lsn)}"
        )
        return int(rows[0]["fence"]) if rows and int(rows[0]["n"]) else None

    def unfinished(
        self, fence_offset: int, collection_topics: str, prefix: str
    ) -> Unfinished | None:
        """Transactions ended at or before `fence_offset` with fewer events applied or
        dead-lettered than their END counted, on tables whose topic (`prefix.schema.table`)
        matches the regular expression `collection_topics`; None when there are none."""
        wanted = (
            f"match(concat({quote(prefix + '.')}, data_collection), {quote(collection_topics)})"
        )
        first = "(e.`offset`, e.data_collection)"  # the earliest gap, named in the log
        rows = self.ch.rows(
            f"""SELECT uniqExact(e.tx_id) AS transactions, argMin(e.tx_id, {first}) AS tx_id,
                       argMin(e.data_collection, {first}) AS data_collection,
                       argMin(e.expected, {first}) AS expected,
                       argMin(coalesce(p.settled, 0), {first}) AS settled
                FROM (SELECT tx_id, data_collection, expected, `offset` FROM {self.ends} FINAL
                      WHERE `offset` <= {int(fence_offset)} AND {wanted}) AS e
                LEFT JOIN (SELECT tx_id, data_collection,
                                  sum(applied) + sum(dead_lettered) AS settled
                           FROM {self.progress} WHERE {wanted}
                           GROUP BY tx_id, data_collection) AS p
                  ON p.tx_id = e.tx_id AND p.data_collection = e.data_collection
                WHERE coalesce(p.settled, 0) < e.expected"""
        )
        if not rows or not int(rows[0]["transactions"]):
            return None
        row = rows[0]
        return Unfinished(int(row["transactions"]), row["tx_id"], row["data_collection"],
                          int(row["expected"]), int(row["settled"]))  # fmt: skip
