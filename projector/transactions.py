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

**Read-your-writes** asks a different question: a writer that committed and then read
`pg_current_wal_lsn()` = L wants to know whether a read model over tables C shows its transaction.
The watermark alone cannot say (it moves only when a transaction on C completes, so a writer whose
L lies past the last one would wait for the next write to C). `ConsistencyTracker` answers it with
the read model's **consistency LSN**, the largest P such that every transaction on C that committed
at or before P is applied completely. The argument, step by step:
1. An END event carries the transaction's commit LSN (pgoutput's end-of-commit position, after the
   colon of its id; measured equal to the writer's `pg_current_wal_lsn()` right after an idle
   commit), and Debezium writes ENDs to the one-partition transaction topic in commit order: along
   the topic, END LSNs grow.
2. The ledger records ENDs in topic order (batches of one partition, in order). So once an END
   with LSN E is recorded, every transaction that committed before it is recorded too.
3. A writer's transaction X has commit LSN <= L. If the ledger holds an END with LSN >= L, X's END
   is recorded, at or before it.
4. Hence: if no recorded transaction on C is incomplete, P = the newest recorded END's LSN (of any
   table: Debezium's heartbeat transactions, every few seconds, keep it moving on an idle
   database). If the first incomplete transaction on C has LSN I, P = I - 1: everything on C
   before it is complete, and it is not.
5. A read model shows the writer's transaction when P >= L. P only grows (applied counts only
   grow), and P >= the watermark's LSN.
Rows of the initial snapshot belong to no transaction: the consistency LSN says nothing about them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from projector.checkpoint import BatchRange
from projector.clickhouse import ClickHouse, ident, insert_statement, quote
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
                 "expected UInt64", "commit_ms Int64 DEFAULT 0"],
                "ReplacingMergeTree", "", "(tx_id, data_collection)",
            )
        )  # fmt: skip
        # Ledgers created before the commit time was kept (0 = unknown for their rows).
        self.ch.execute(
            topology.alter_table(self.ends, "ADD COLUMN IF NOT EXISTS commit_ms Int64 DEFAULT 0")
        )
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
             "data_collection": c["data_collection"], "expected": int(c["event_count"]),
             "commit_ms": int(value.get("ts_ms") or 0)}
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

    def first_incomplete(self, collections: Sequence[str], after: int) -> dict[str, int]:
        """Per collection, the transaction-topic offset of its first incomplete transaction
        recorded after offset `after`; collections with none are absent."""
        wanted = ", ".join(quote(c) for c in collections)
        rows = self.ch.rows(
            f"""SELECT e.data_collection AS collection, min(e.`offset`) AS off
                FROM (SELECT tx_id, data_collection, `offset`, expected FROM {self.ends} FINAL
                      WHERE `offset` > {int(after)} AND data_collection IN ({wanted})) AS e
                LEFT JOIN (SELECT tx_id, data_collection, sum(applied) AS applied
                           FROM {self.progress} WHERE data_collection IN ({wanted})
                             AND tx_id IN (SELECT tx_id FROM {self.ends}
                                           WHERE `offset` > {int(after)})
                           GROUP BY tx_id, data_collection) AS p
                  ON p.tx_id = e.tx_id AND p.data_collection = e.data_collection
                WHERE coalesce(p.applied, 0) < e.expected
                GROUP BY e.data_collection"""
        )
        return {row["collection"]: int(row["off"]) for row in rows}

    def newest_end(
        self, after: int = -1, before: int | None = None, collections: Sequence[str] | None = None
    ) -> RecordedEnd | None:
        """The recorded END with the largest offset in (`after`, `before`), touching
        `collections` when given."""
        where = [f"`offset` > {int(after)}"]
        if before is not None:
            where.append(f"`offset` < {int(before)}")
        if collections is not None:
            where.append(f"data_collection IN ({', '.join(quote(c) for c in collections)})")
        rows = self.ch.rows(
            f"SELECT `offset` AS off, tx_id, lsn, commit_ms FROM {self.ends} "
            f"WHERE {' AND '.join(where)} ORDER BY `offset` DESC LIMIT 1"
        )
        if not rows:
            return None
        row = rows[0]
        return RecordedEnd(int(row["off"]), row["tx_id"], int(row["lsn"]), int(row["commit_ms"]))


@dataclass(frozen=True)
class RecordedEnd:
    """One transaction's END as the ledger holds it."""

    offset: int
    tx_id: str
    lsn: int
    commit_ms: int  # Postgres commit time (Debezium's ts_ms); 0 when unknown

    def watermark(self) -> Watermark:
        return Watermark(self.tx_id, self.lsn, self.offset)


@dataclass(frozen=True)
class Consistency:
    """Where a group of tables (a read model's sources) stands for readers (module docstring)."""

    lsn: int  # every transaction on the tables committed at or before it is applied; 0: none known
    commit_ms: int  # commit time of the newest END at or before `lsn`; 0 when unknown
    watermark: Watermark | None  # the newest complete transaction on the tables
    waiting_for: str | None  # the first incomplete transaction on the tables (its tx id)

    @property
    def lsn_text(self) -> str:
        return lsn_text(self.lsn)


NOTHING_KNOWN = Consistency(0, 0, None, None)


class ConsistencyTracker:
    """The consistency LSN of named groups of tables, kept up to date by `refresh` (steps of the
    module docstring). Each refresh reads only ENDs recorded after the earliest point some group
    could still be waiting at, so its cost follows the new transactions, not the ledger's size."""

    def __init__(self, ledger: TransactionLedger, groups: Mapping[str, Sequence[str]]) -> None:
        self.ledger = ledger
        self.groups = {name: list(tables) for name, tables in groups.items()}
        self.current: dict[str, Consistency] = dict.fromkeys(self.groups, NOTHING_KNOWN)
        # Every END at or before this one is complete for every group (None: none known yet).
        self._settled: RecordedEnd | None = None

    def refresh(self) -> dict[str, Consistency]:
        after = -1 if self._settled is None else self._settled.offset
        newest = self.ledger.newest_end(after) or self._settled
        if newest is None:
            return self.current  # nothing recorded yet
        if newest == self._settled:
            return self.current  # nothing recorded since, and nothing was incomplete
        every = sorted({t for tables in self.groups.values() for t in tables})
        blocked = self.ledger.first_incomplete(every, after) if every else {}
        settled: RecordedEnd | None = newest
        for name, tables in self.groups.items():
            first = min((blocked[t] for t in tables if t in blocked), default=None)
            # The newest complete transaction on the tables: before the first incomplete one.
            mark = self.ledger.newest_end(after, first, tables)
            watermark = mark.watermark() if mark is not None else self.current[name].watermark
            if first is None:  # step 4, nothing incomplete: the newest END of any table
                self.current[name] = Consistency(newest.lsn, newest.commit_ms, watermark, None)
                continue
            waiting = self.ledger.newest_end(first - 1, first + 1)  # the incomplete END itself
            preceding = self.ledger.newest_end(after, first) or self._settled
            self.current[name] = Consistency(  # step 4: just before the first incomplete one
                max(0, waiting.lsn - 1) if waiting else 0,
                preceding.commit_ms if preceding else 0,
                watermark,
                waiting.tx_id if waiting else None,
            )
            if settled is not None and (preceding is None or preceding.offset < settled.offset):
                settled = preceding
        self._settled = settled
        return self.current
