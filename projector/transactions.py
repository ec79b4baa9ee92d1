"""Consistency watermarks from Debezium's transaction metadata.

With `provide.transaction.metadata`, Debezium writes a BEGIN and an END event per transaction to
`<prefix>.transaction` (one partition, commit order); the END event counts the transaction's events
per table (`data_collections`), and every change event names its transaction (`transaction.id`,
`"<txId>:<lsn>"`, of which only the txId identifies the transaction). Two ledgers in the control database, both written under the commit protocol's
deduplication tokens, so they are exact across replays:

- `transactions`: per ended transaction and table, the number of events Debezium emitted;
- `transaction_progress` (SummingMergeTree): per transaction and table, the events applied.

The **watermark** of a set of source tables is the newest transaction T such that every transaction
up to T (in commit order, i.e. transaction-topic offset) that touched those tables has all its events
on them applied. A read model over those tables then shows every transaction up to T completely and
none partially... among transactions Debezium has already reported as ended. A dead-lettered event
keeps its transaction incomplete: the watermark stops there, as it should.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from projector.checkpoint import BatchRange
from projector.clickhouse import ClickHouse, ident, insert_statement, quote


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
                ["tx_id String", "data_collection String", "applied UInt64"],
                "SummingMergeTree", "", "(tx_id, data_collection)",
            )
        )  # fmt: skip

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

    def record_progress(self, batch: BatchRange, applied: dict[tuple[str, str], int]) -> None:
        """Events applied by one batch, per (transaction id, schema.table)."""
        rows = [
            {"tx_id": xid_of(tx), "data_collection": collection, "applied": count}
            for (tx, collection), count in applied.items()
        ]
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
