"""Consistency watermarks from Debezium's transaction metadata.

With `provide.transaction.metadata`, Debezium writes a BEGIN and an END event per transaction to
`<prefix>.transaction` (one partition, commit order); the END event counts the transaction's events
per table (`data_collections`), and every change event names its transaction (`transaction.id`).
Both ids read `"<xid>:<lsn>"`, and the LSN differs (measured on the stack: a change event's is its
own WAL position, the END's the end of the commit record, the BEGIN's the first change's). Two
ledgers in the control database, both written under the commit protocol's deduplication tokens, so
they are exact across replays:

- `transaction_ends` (keyed by the END's offset on the transaction topic and the table): per ended
  transaction and table, the number of events Debezium emitted, with the xid and the END's LSN;
- `transaction_events` (SummingMergeTree): per batch, transaction (xid) and table, the events
  applied and the events dead-lettered (never applied: they hold the watermark, not
  `--until-caught-up`), with the smallest and largest LSN among them (their *span*).

**Which END a change event belongs to.** The xid alone does not say: Postgres' transaction ids are
32 bits and wrap around, so after 2^32 transactions one xid names another transaction. The rule: an
event of xid X at LSN l belongs to the END of xid X with the smallest LSN >= l. Why:
  1. A transaction's changes precede its commit in the WAL: l <= its END's LSN.
  2. Postgres reuses xid X only once the earlier X has long ended (wraparound protection freezes
     it first), so the earlier X's END LSN is below every LSN of the later X.
  Hence the earlier X's END is below l for every event of the later X, and the later X's END is
  above the earlier X's events: the smallest END >= l is the event's own. A span counts for the
  END that is smallest >= its first LSN (an ASOF join) when that END is >= its last LSN too; a span
  that straddles two transactions with one xid (one batch holding both) counts for neither, which
  holds the watermark rather than claim a transaction complete.

**Counted once.** Kafka Connect's source is at-least-once: after a restart of Connect (or of
Kafka, or of Debezium's task) Debezium sends again what it sent since its last flushed offset --
change events, BEGINs and ENDs -- and a producer retry may write one record twice. Kafka then
holds those events twice, at different offsets, and the ledger must count each once:
  1. *An END sent again is dropped.* Debezium writes ENDs in commit order and every commit has
     an END LSN of its own, so along the transaction topic a new END's LSN is larger than every
     END's before it. An END whose LSN is at most the largest recorded at a smaller offset is
     one the ledger already holds (`newest_lsn`; pruning keeps the newest END, so the largest
     LSN never goes back). The first copy, at the smaller offset, keeps the transaction's place.
  2. *An event sent again is the same event.* Every change event names its transaction and its
     `data_collection_order`: its number, 1 to N, among the transaction's N events on its table
     (the END's `event_count`). Debezium keeps that count in the offsets it flushes and resumes
     from them, so an event sent again carries the number it had. The ledger keeps the numbers
     of each span (`applied_orders`, `dead_orders`, united when rows merge) and counts a
     transaction's distinct numbers: however often Kafka holds an event, it is one number, and
     a transaction is complete when all N are there -- never because some arrived twice.
     (Counting numbers, not LSNs: the rows of one COPY share one WAL record's LSN.)
  3. *The replicas need nothing of this*: an event applied twice writes the same `_version`
     (projector/replicas/catalog.py), so the replica is the same.
An event Debezium sent without a `data_collection_order` is counted as it comes (as the ledger
did before it kept the numbers: `applied_unnamed`, `dead_unnamed`, which also hold the counts of
rows written before the upgrade). An event sent again after its transaction was pruned leaves a
span no END claims: it changes no answer (spans count only for ENDs of their xid).
One case puts a copy first: an END that could not be read (below) is dead-lettered, Connect
sends it again, readable, and the copy is recorded at its later offset. When `projector dlq
replay` then records the END at its own offset, that is its place in commit order: the copy is
deleted (`_copies_elsewhere`), so the transaction has one END and the watermark never passes a
transaction committed after it while it is incomplete.

**An END that cannot be read** (not Confluent-framed, an unknown or broken schema) may have ended
a transaction on any table: skipping it would let a watermark pass a transaction that is not
complete. It is recorded as a row of table `*` that touches every table and that nothing
completes, and it is dead-lettered; `projector dlq replay` records the END once it decodes and
drops that row. Its LSN is one past the END before it (its transaction committed later), which
keeps the consistency LSN and the fence below sound.

The **watermark** of a set of source tables is the newest transaction T such that every transaction
up to T (in commit order, i.e. transaction-topic offset) that touched those tables has all its events
on them applied. A read model over those tables then shows every transaction up to T completely and
none partially... among transactions Debezium has already reported as ended. A dead-lettered event
keeps its transaction incomplete: the watermark stops there, as it should.

The same ledgers tell `projector run --until-caught-up` when every change committed up to a source
LSN is applied (`fence_offset`, `unfinished`; the argument is in projector/commit/finish_line.py).

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

**Cheap to ask.** A running projector looks for each read model's watermark from the one it found
last (the watermark only moves forward: applied counts only grow), so it reads the ENDs recorded
since, not the history (`TransactionLedger.watermark(after=...)`; every read goes through chDB's one
session, the lock ingestion holds too). The query service's `ConsistencyTracker` reads the same way.

**Pruning** (`TransactionLedger.prune`, every few minutes from the running projector). A row of a
complete END (all its events applied) answers no question any more, except as "the newest END
before" some point. Every question the ledger answers — a watermark, a consistency LSN, the first
incomplete transaction, the unfinished ones — asks for incomplete rows, or for the newest END (on
some tables, or on any) before a *cut*: the first incomplete END of some table, or the end of the
ledger. So the ledger keeps every END with an incomplete row and, for each cut, the newest END
before it on each table and of any table (`rows_to_keep`), and deletes the rest with their spans;
every answer stays the same, and the ledger's size follows the incomplete transactions and the
tables, not the history. Rows of Debezium's heartbeat and signal tables (`debezium.*`), which no
read model reads and nothing applies, count as complete here. The fence of `--until-caught-up` may
move to a later END when its own was pruned: the run then waits for a little more, never less.
The ENDs go before their spans: a crash in between leaves spans no END claims, never a complete
END without its counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from connectors.config import CONTROL_SCHEMA
from projector.clickhouse import ClickHouse, ident, insert_statement, literal_chunks, quote
from projector.commit.checkpoint import BatchRange
from projector.commit.transactions import (
    EventCounts,
    RecordedEnd,
    Unfinished,
    Watermark,
    lsn_of,
    xid_of,
)

log = logging.getLogger("projector")


# The data collection of an END the projector could not decode: it touches every table, and
# nothing ever completes it (module docstring, "An END that cannot be read").
UNREADABLE = "*"
# Tables no read model reads and nothing applies: Debezium's heartbeat and signal tables. Their
# rows count as settled when the ledger is pruned.
NEVER_WAITED_FOR = f"{CONTROL_SCHEMA}."
# The orders of a span's events: merged (rows of one span, say a batch applied again under
# another token) by union, so an event is one order however often it arrives.
ORDERS_TYPE = "SimpleAggregateFunction(groupUniqArrayArray, Array(UInt64))"
ORDER_COLUMNS = [
    f"applied_orders {ORDERS_TYPE}",
    f"dead_orders {ORDERS_TYPE}",
    # Events that carry no order, counted as they came. A row written before the orders were kept
    # carries none: all its events are such (the DEFAULT, for old rows and for the copy below).
    "applied_unnamed UInt64 DEFAULT applied",
    "dead_unnamed UInt64 DEFAULT dead_lettered",
]


class TransactionLedger:
    def __init__(self, ch: ClickHouse, database: str, projection: str) -> None:
        self.ch = ch
        self.database = database
        self.ends = f"{ident(database)}.transaction_ends"
        self.progress = f"{ident(database)}.transaction_events"
        self.projection = projection

    def create(self) -> None:
        topology = self.ch.topology
        # One row per END and table, keyed by the END's place on the transaction topic.
        self.ch.execute(
            topology.create_table(
                self.ends,
                [
                    "tx_id String",
                    "lsn UInt64",
                    "`offset` Int64",
                    "data_collection String",
                    "expected UInt64",
                    "commit_ms Int64 DEFAULT 0",
                ],
                "ReplacingMergeTree",
                "",
                "(`offset`, data_collection)",
            )
        )
        # Summed per transaction, table and span: rows of two transactions that share an xid
        # (after wraparound) have different spans and stay apart. `applied` and `dead_lettered`
        # count the events as they came; what counts is who they are (module docstring,
        # "Counted once"): their orders, united when rows merge, and the events without one.
        self.ch.execute(
            topology.create_table(
                self.progress,
                [
                    "tx_id String",
                    "data_collection String",
                    "first_lsn UInt64",
                    "last_lsn UInt64",
                    "applied UInt64",
                    "dead_lettered UInt64",
                    *ORDER_COLUMNS,
                ],
                "SummingMergeTree",
                "",
                "(tx_id, data_collection, first_lsn, last_lsn)",
            )
        )
        for column in ORDER_COLUMNS:  # a ledger from before "Counted once"
            self.ch.execute(
                topology.alter_table(self.progress, f"ADD COLUMN IF NOT EXISTS {column}")
            )
        self._copy_earlier_ledger()

    def _copy_earlier_ledger(self) -> None:
        """Ledgers written before the spans were kept (`transactions`, `transaction_progress`,
        keyed by xid alone) are copied once into the new ones, so that transactions in flight
        across the upgrade still complete: each old count becomes a span from LSN 0, which
        counts for the oldest END of its xid (what the old ledger matched too). Each table is
        copied only while its new one is empty, the counts first: a copy cut short by a crash
        is redone, or was done."""
        found = {
            row["name"]
            for row in self.ch.rows(
                f"SELECT name FROM system.tables WHERE database = {quote(self.database)} "
                "AND name IN ('transactions', 'transaction_progress')"
            )
        }
        if found != {"transactions", "transaction_progress"}:
            return
        old = ident(self.database)
        copies = [
            (
                self.progress,
                "tx_id, data_collection, first_lsn, last_lsn, applied, dead_lettered",
                f"SELECT tx_id, data_collection, 0, 0, applied, dead_lettered "
                f"FROM {old}.transaction_progress",
            ),
            (
                self.ends,
                "tx_id, lsn, `offset`, data_collection, expected, commit_ms",
                f"SELECT tx_id, lsn, `offset`, data_collection, expected, commit_ms "
                f"FROM {old}.transactions FINAL",
            ),
        ]
        for table, columns, select in copies:
            if int(self.ch.rows(f"SELECT count() AS n FROM {table}")[0]["n"]) == 0:
                self.ch.execute(f"INSERT INTO {table} ({columns}) {select}")

    def record_ends(
        self,
        batch: BatchRange,
        events: list[tuple[int, dict[str, Any] | None]],
        projection: str | None = None,
    ) -> None:
        """Events of the transaction topic (offset, decoded value; None for one that could not
        be decoded), in offset order: a row per END and table, and a row that holds every
        watermark for an END that could not be read. BEGINs are skipped, and so is an END that
        Kafka holds a second time (module docstring, "Counted once"). `projection` names who
        records them in the deduplication token (default: the ledger's own; a DLQ replay is
        another recorder of the same offsets)."""
        if not events:
            return
        first, last = events[0][0], events[-1][0]
        rows: list[dict[str, Any]] = []
        newest = self.newest_lsn(before=first)  # of the ENDs recorded before these
        skipped = 0
        for offset, value in events:
            if value is None:
                # Committed after the END before it: its LSN is at least one past that one's.
                newest += 1
                rows.append(
                    {
                        "tx_id": f"unreadable@{offset}",
                        "lsn": newest,
                        "offset": offset,
                        "data_collection": UNREADABLE,
                        "expected": 1,
                        "commit_ms": 0,
                    }
                )
                continue
            if value.get("status") != "END":
                continue
            lsn = lsn_of(value["id"])
            if lsn <= newest:
                skipped += 1
                continue  # sent again: its first copy, earlier on the topic, is the one counted
            newest = lsn
            rows += [
                {
                    "tx_id": xid_of(value["id"]),
                    "lsn": lsn,
                    "offset": offset,
                    "data_collection": c["data_collection"],
                    "expected": int(c["event_count"]),
                    "commit_ms": int(value.get("ts_ms") or 0),
                }
                for c in value.get("data_collections") or []
            ]
        later = self._copies_elsewhere(rows, first, last)
        if later:
            # A DLQ replay records an END at its own offset after a copy of it, sent again by
            # Connect, was recorded at a later one: this is its place in commit order; the copy
            # goes (one END per transaction, or the spans would count for only one of them).
            offsets = set(later)
            self.ch.execute(
                f"DELETE FROM {self.ends}{self.ch.topology.on_cluster()} WHERE `offset` IN "
                f"({', '.join(str(o) for o in sorted(offsets))})"
            )
        if skipped:
            log.info(
                "transaction ledger: %d END event(s) at offsets %d-%d were sent again "
                "(a Connect restart); counted once",
                skipped,
                first,
                last,
            )
        if rows:
            token = batch.token(projection or self.projection, "transaction_ends")
            self.ch.execute(insert_statement(self.ends, list(rows[0]), rows, token))

    def _copies_elsewhere(
        self, rows: list[dict[str, Any]], first: int, last: int
    ) -> dict[int, int]:
        """Of the ENDs about to be recorded (`rows`, at offsets `first`..`last`), the ones the
        ledger holds already at a *later* offset (offset -> LSN); the ones it holds at an earlier
        offset are dropped from `rows`. Found by the LSN range of `rows`: a handful of ENDs."""
        lsns = {int(r["lsn"]) for r in rows if r["data_collection"] != UNREADABLE}
        if not lsns:
            return {}
        found = self.ch.rows(
            f"SELECT DISTINCT `offset` AS off, lsn FROM {self.ends} "
            f"WHERE lsn BETWEEN {min(lsns)} AND {max(lsns)} "
            f"AND data_collection != {quote(UNREADABLE)} "
            f"AND (`offset` < {int(first)} OR `offset` > {int(last)})"
        )
        earlier = {int(r["lsn"]) for r in found if int(r["off"]) < first}
        rows[:] = [r for r in rows if int(r["lsn"]) not in earlier]
        return {
            int(r["off"]): int(r["lsn"])
            for r in found
            if int(r["off"]) > last and int(r["lsn"]) in lsns
        }

    def newest_lsn(self, before: int) -> int:
        """The largest LSN of the ENDs recorded at transaction-topic offsets below `before` (0:
        none). Pruning keeps the newest END, so it never goes back."""
        rows = self.ch.rows(
            f"SELECT max(lsn) AS lsn FROM {self.ends} WHERE `offset` < {int(before)}"
        )
        return int(rows[0]["lsn"]) if rows else 0

    def forget_unreadable(self, offset: int) -> None:
        """Drop the row an unreadable END at `offset` left (its END has been recorded since)."""
        self.ch.execute(
            f"DELETE FROM {self.ends}{self.ch.topology.on_cluster()} "
            f"WHERE `offset` = {int(offset)} AND data_collection = {quote(UNREADABLE)}"
        )

    def record_progress(
        self,
        batch: BatchRange,
        applied: EventCounts,
        dead_lettered: EventCounts | None = None,
        projection: str | None = None,
    ) -> None:
        """Events applied and events dead-lettered by one batch, per (xid, schema.table).
        `projection` names who applied them in the deduplication token (default: the ledger's
        own; a DLQ replay is another applier of the same batch range)."""
        dead_lettered = dead_lettered or {}
        rows = []
        for key in sorted({*applied, *dead_lettered}):
            done, dead = applied.get(key), dead_lettered.get(key)
            span = done + dead if done and dead else done or dead
            assert span is not None  # the key is in one of the two
            rows.append(
                {
                    "tx_id": key[0],
                    "data_collection": key[1],
                    "first_lsn": span.first_lsn,
                    "last_lsn": span.last_lsn,
                    "applied": done.events if done else 0,
                    "dead_lettered": dead.events if dead else 0,
                    "applied_orders": sorted(done.orders) if done else [],
                    "dead_orders": sorted(dead.orders) if dead else [],
                    "applied_unnamed": done.unnamed if done else 0,
                    "dead_unnamed": dead.unnamed if dead else 0,
                }
            )
        if rows:
            token = batch.token(projection or self.projection, "transaction_events")
            self.ch.execute(insert_statement(self.progress, list(rows[0]), rows, token))

    def _settled(self, where: str) -> str:
        """A subquery: the END rows matching `where` (on `transaction_ends`' columns) with the
        events `applied`, `dead_lettered` and `settled` (either) that belong to them (module
        docstring, "Which END"): a span counts for the END of its xid and table with the
        smallest LSN at or after its first event, when that END is at or after its last event
        too. Each event counts once (module docstring, "Counted once")."""
        xids = f"SELECT tx_id FROM {self.ends} WHERE {where}"
        return f"""(SELECT e.`offset` AS `offset`, e.tx_id AS tx_id, e.lsn AS lsn,
                    e.data_collection AS data_collection, e.expected AS expected,
                    e.commit_ms AS commit_ms, coalesce(m.applied, 0) AS applied,
                    coalesce(m.dead_lettered, 0) AS dead_lettered,
                    coalesce(m.settled, 0) AS settled
            FROM (SELECT * FROM {self.ends} FINAL WHERE {where}) AS e
            LEFT JOIN (
                SELECT `offset`, data_collection,
                       length(applied_orders) + applied_unnamed AS applied,
                       length(dead_orders) + dead_unnamed AS dead_lettered,
                       length(arrayDistinct(arrayConcat(applied_orders, dead_orders)))
                         + applied_unnamed + dead_unnamed AS settled
                FROM (
                    SELECT o.`offset` AS `offset`, p.data_collection AS data_collection,
                           sum(p.applied_unnamed) AS applied_unnamed,
                           sum(p.dead_unnamed) AS dead_unnamed,
                           groupUniqArrayArray(p.applied_orders) AS applied_orders,
                           groupUniqArrayArray(p.dead_orders) AS dead_orders
                    FROM (SELECT tx_id, data_collection, first_lsn, last_lsn,
                                 sum(applied_unnamed) AS applied_unnamed,
                                 sum(dead_unnamed) AS dead_unnamed,
                                 groupUniqArrayArray(applied_orders) AS applied_orders,
                                 groupUniqArrayArray(dead_orders) AS dead_orders
                          FROM {self.progress} WHERE tx_id IN ({xids})
                          GROUP BY tx_id, data_collection, first_lsn, last_lsn) AS p
                    ASOF INNER JOIN (SELECT tx_id, data_collection, lsn, `offset`
                                     FROM {self.ends} FINAL WHERE tx_id IN ({xids})) AS o
                      ON p.tx_id = o.tx_id AND p.data_collection = o.data_collection
                     AND p.first_lsn <= o.lsn
                    WHERE p.last_lsn <= o.lsn
                    GROUP BY o.`offset`, p.data_collection)
            ) AS m ON m.`offset` = e.`offset` AND m.data_collection = e.data_collection)"""

    def watermark(self, collections: list[str], after: Watermark | None = None) -> Watermark | None:
        """The newest transaction up to which every transaction on `collections` is complete.
        `after`: a watermark of the same collections found before; the ledger is read from it on
        (the watermark only moves forward: applied counts only grow)."""
        wanted = ", ".join(quote(c) for c in [*collections, UNREADABLE])
        since = -1 if after is None else after.offset
        rows = self.ch.rows(
            f"""SELECT `offset` AS off, any(tx_id) AS tx_id, any(lsn) AS lsn,
                       min(applied >= expected) AS complete
                FROM {self._settled(f"`offset` > {since} AND data_collection IN ({wanted})")}
                GROUP BY `offset` ORDER BY `offset`"""
        )
        newest = after
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
        first = "(`offset`, data_collection)"  # the earliest gap, named in the log
        rows = self.ch.rows(
            f"""SELECT uniqExact(`offset`) AS gaps, argMin(tx_id, {first}) AS gap_tx,
                       argMin(data_collection, {first}) AS gap_collection,
                       argMin(expected, {first}) AS gap_expected,
                       argMin(settled, {first}) AS gap_settled
                FROM {self._settled(f"`offset` <= {int(fence_offset)} AND {wanted}")}
                WHERE settled < expected"""
        )
        if not rows or not int(rows[0]["gaps"]):
            return None
        row = rows[0]
        return Unfinished(
            int(row["gaps"]),
            row["gap_tx"],
            row["gap_collection"],
            int(row["gap_expected"]),
            int(row["gap_settled"]),
        )

    def first_incomplete(self, collections: Sequence[str], after: int) -> dict[str, int]:
        """Per collection, the transaction-topic offset of its first incomplete transaction
        recorded after offset `after` (an unreadable END is incomplete on every collection);
        collections with none are absent."""
        wanted = ", ".join(quote(c) for c in [*collections, UNREADABLE])
        rows = self.ch.rows(
            f"""SELECT data_collection AS collection, min(`offset`) AS off
                FROM {self._settled(f"`offset` > {int(after)} AND data_collection IN ({wanted})")}
                WHERE applied < expected GROUP BY data_collection"""
        )
        found = {row["collection"]: int(row["off"]) for row in rows}
        unreadable = found.pop(UNREADABLE, None)
        if unreadable is not None:
            for collection in collections:
                found[collection] = min(found.get(collection, unreadable), unreadable)
        return found

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
        return self._newest(" AND ".join(where))

    def end_at_or_before(self, lsn: int) -> RecordedEnd | None:
        """The newest recorded END whose LSN is at most `lsn` (ENDs grow in LSN along offsets)."""
        return self._newest(f"lsn <= {int(lsn)}")

    def _newest(self, where: str) -> RecordedEnd | None:
        rows = self.ch.rows(
            f"SELECT `offset` AS off, tx_id, lsn, commit_ms FROM {self.ends} "
            f"WHERE {where} ORDER BY `offset` DESC LIMIT 1"
        )
        if not rows:
            return None
        row = rows[0]
        return RecordedEnd(int(row["off"]), row["tx_id"], int(row["lsn"]), int(row["commit_ms"]))

    def prune(self) -> int:
        """Delete the rows no question to the ledger needs any more; returns the ENDs deleted
        (module docstring, "Pruning")."""
        rows = self.ch.rows(
            f"""SELECT `offset` AS off, data_collection AS collection,
                       applied >= expected OR startsWith(data_collection, {quote(NEVER_WAITED_FOR)})
                         AS complete
                FROM {self._settled("1")} ORDER BY `offset`"""
        )
        keep = rows_to_keep(
            [(int(r["off"]), r["collection"], bool(int(r["complete"]))) for r in rows]
        )
        doomed = sorted({int(r["off"]) for r in rows} - keep)
        cluster = self.ch.topology.on_cluster()
        for chunk in literal_chunks([str(o) for o in doomed]):
            offsets = ", ".join(chunk)
            spans = self.ch.rows(
                f"""SELECT DISTINCT p.tx_id AS tx_id, p.data_collection AS collection,
                           p.first_lsn AS first_lsn, p.last_lsn AS last_lsn
                    FROM (SELECT DISTINCT tx_id, data_collection, first_lsn, last_lsn
                          FROM {self.progress} WHERE tx_id IN
                            (SELECT tx_id FROM {self.ends} WHERE `offset` IN ({offsets}))) AS p
                    ASOF INNER JOIN (SELECT tx_id, data_collection, lsn, `offset`
                                     FROM {self.ends} FINAL) AS o
                      ON p.tx_id = o.tx_id AND p.data_collection = o.data_collection
                     AND p.first_lsn <= o.lsn
                    WHERE o.`offset` IN ({offsets})"""
            )
            # The ENDs first: a crash before their spans go leaves spans no END claims, never
            # a complete END that lost its counts.
            self.ch.execute(f"DELETE FROM {self.ends}{cluster} WHERE `offset` IN ({offsets})")
            keys = [
                f"({quote(s['tx_id'])}, {quote(s['collection'])}, {int(s['first_lsn'])}, "
                f"{int(s['last_lsn'])})"
                for s in spans
            ]
            for group in literal_chunks(keys):
                self.ch.execute(
                    f"DELETE FROM {self.progress}{cluster} "
                    f"WHERE (tx_id, data_collection, first_lsn, last_lsn) IN ({', '.join(group)})"
                )
        return len(doomed)


def rows_to_keep(rows: Sequence[tuple[int, str, bool]]) -> set[int]:
    """Of the ledger's END rows (offset, collection, complete), in offset order, the offsets to
    keep: every END with an incomplete row, and for every cut X (each collection's first
    incomplete offset, and the end of the ledger) the newest END before X on each collection
    and the newest END before X of any collection (module docstring, "Pruning")."""
    first_incomplete: dict[str, int] = {}
    keep: set[int] = set()
    for offset, collection, complete in rows:
        if not complete:
            keep.add(offset)
            first_incomplete.setdefault(collection, offset)
    cuts = sorted(set(first_incomplete.values()), reverse=True)  # the next cut is last
    newest: dict[str | None, int] = {}  # per collection, and of any (None), so far
    for offset, collection, _ in rows:
        while cuts and offset >= cuts[-1]:
            keep.update(newest.values())  # the newest ENDs before this cut
            cuts.pop()
        newest[collection] = newest[None] = offset
    keep.update(newest.values())  # before the end of the ledger
    return keep
