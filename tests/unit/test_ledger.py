"""The transaction ledger on a real (embedded) ClickHouse: which END events count for, an END
that cannot be read, the incremental watermark and pruning (projector/commit/ledger.py).

Postgres' xids wrap around after 2^32 transactions, so the same xid names two transactions far
apart; no test stack runs that long, so the ledger gets the END events and event spans Debezium
would have produced (ids `<xid>:<lsn>`, ENDs in commit order)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from projector.clickhouse import ChdbBackend, literal_chunks
from projector.commit.checkpoint import BatchRange
from projector.commit.ledger import TransactionLedger, rows_to_keep
from projector.commit.transactions import EventPlace, EventSpan

A, B, HEARTBEAT = "public.a", "public.b", "debezium.heartbeat"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    # chDB holds one engine per process: one for the module, a database per test.
    backend = ChdbBackend(str(tmp_path_factory.mktemp("chdb")))
    yield backend
    backend.close()


_databases = itertools.count()
_batches = itertools.count()


def batch(topic: str = "cdc.public.a") -> BatchRange:
    """A batch range of its own, so that its inserts have tokens of their own."""
    n = next(_batches)
    return BatchRange(topic, 0, n, n)


@pytest.fixture
def ledger(engine: ChdbBackend) -> TransactionLedger:
    database = f"ledger_test_{next(_databases)}"
    engine.execute(f"CREATE DATABASE {database}")
    ledger = TransactionLedger(engine, database, "replica")
    ledger.create()
    return ledger


def end(offset: int, xid: int, lsn: int, **events: int) -> tuple[int, dict]:
    collections = [
        {"data_collection": c.replace("__", "."), "event_count": n} for c, n in events.items()
    ]
    return offset, {"status": "END", "id": f"{xid}:{lsn}", "data_collections": collections}


def applied(ledger: TransactionLedger, collection: str, *tx_ids: str) -> None:
    """One batch applying the change events with these Debezium ids on `collection`."""
    counts: dict[tuple[str, str], EventSpan] = {}
    for tx_id in tx_ids:
        xid, span = EventSpan.of(tx_id)
        key = (xid, collection)
        counts[key] = counts[key] + span if key in counts else span
    ledger.record_progress(batch(), counts)


def test_two_transactions_with_one_xid_stay_apart(ledger: TransactionLedger) -> None:
    """xid 7 commits at LSN 1000 (complete); 2^32 transactions later xid 7 again, at LSN
    9,000,000, with one of its two events applied: it is not complete, and the first one's
    events do not make it so."""
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            end(1, 7, 1000, public__a=2),
            end(3, 8, 2000, public__a=1),
            end(5, 7, 9_000_000, public__a=2),
        ],
    )
    applied(ledger, A, "7:900", "7:950")
    applied(ledger, A, "8:1900")
    applied(ledger, A, "7:8999000")
    mark = ledger.watermark([A])
    assert mark is not None and (mark.offset, mark.tx_id) == (3, "8")
    assert ledger.first_incomplete([A], -1) == {A: 5}
    # The second event of the second xid 7 arrives: now it is complete.
    applied(ledger, A, "7:8999500")
    mark = ledger.watermark([A])
    assert mark is not None and (mark.offset, mark.lsn) == (5, 9_000_000)


def test_a_span_across_two_transactions_with_one_xid_counts_for_neither(
    ledger: TransactionLedger,
) -> None:
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            end(1, 7, 1000, public__a=1),
            end(5, 7, 9_000_000, public__a=1),
        ],
    )
    applied(ledger, A, "7:900", "7:8999000")  # one batch, both: the span cannot tell them apart
    assert ledger.watermark([A]) is None  # held (truthful), never claimed


def test_an_unreadable_end_holds_every_watermark_until_it_is_recorded(
    ledger: TransactionLedger,
) -> None:
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            end(1, 10, 1000, public__a=1),
            (3, None),
            end(5, 12, 3000, public__b=1),
        ],
    )
    applied(ledger, A, "10:900")
    applied(ledger, B, "12:2900")
    for tables in ([A], [B], [A, B]):
        mark = ledger.watermark(tables)
        assert mark is None or mark.offset < 3, (tables, mark)
    assert ledger.first_incomplete([A, B], -1) == {A: 3, B: 3}
    assert ledger.unfinished(5, r"cdc\.public\..*", "cdc") is None  # not counted: unknown
    # `projector dlq replay` records the END once it reads (here: it touched public.a).
    ledger.record_ends(batch("cdc.transaction"), [end(3, 11, 2000, public__a=1)])
    ledger.forget_unreadable(3)
    assert ledger.first_incomplete([A, B], -1) == {A: 3}
    applied(ledger, A, "11:1900")
    mark = ledger.watermark([A, B])
    assert mark is not None and mark.offset == 5


def test_the_watermark_from_the_last_one_equals_the_watermark_from_scratch(
    ledger: TransactionLedger,
) -> None:
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            end(1, 1, 100, public__a=1),
            end(3, 2, 200, public__a=1),
            end(5, 3, 300, public__a=1),
        ],
    )
    applied(ledger, A, "1:90", "2:190")
    first = ledger.watermark([A])
    assert first is not None and first.offset == 3
    assert ledger.watermark([A], first) == first  # nothing new: the same
    applied(ledger, A, "3:290")
    assert ledger.watermark([A], first) == ledger.watermark([A])


def test_pruning_changes_no_answer(ledger: TransactionLedger) -> None:
    """A ledger with complete transactions, a dead letter (incomplete on b), a table nothing
    applies (c) and heartbeats: pruning deletes rows, and every watermark, the first incomplete
    transactions and the unfinished ones stay what they were. A fence may move later (its END
    may be gone), never earlier: `--until-caught-up` then waits for a little more."""
    ends = []
    for n in range(1, 41):
        offset, lsn = 2 * n + 1, 1000 * n
        if n % 10 == 0:
            ends.append(end(offset, n, lsn, debezium__heartbeat=1))
        elif n in (12, 30):
            ends.append(end(offset, n, lsn, public__c=1))  # nothing applies public.c
        elif n % 3 == 0:
            ends.append(end(offset, n, lsn, public__a=1, public__b=1))
        else:
            ends.append(end(offset, n, lsn, public__a=1))
    ledger.record_ends(batch("cdc.transaction"), ends)
    for _offset, value in ends:
        xid, lsn = value["id"].split(":")
        for c in value["data_collections"]:
            name = c["data_collection"]
            if name == B and xid == "21":
                ledger.record_progress(
                    batch(), {}, {(xid, B): EventSpan(int(lsn) - 5, int(lsn) - 5, unnamed=1)}
                )
            elif name in (A, B):
                applied(ledger, name, f"{xid}:{int(lsn) - 5}")
    sets = [[A], [B], [A, B], [A, "public.c"], ["public.c"], [B, "public.c"]]

    def answers() -> list[object]:
        return [
            *(ledger.watermark(tables) for tables in sets),
            ledger.first_incomplete([A, B, "public.c"], -1),
            ledger.unfinished(81, r"cdc\.public\.(a|b)", "cdc"),
            ledger.fence_offset(40_000),
            ledger.newest_end(),
        ]

    before, fence = answers(), ledger.fence_offset(25_500)
    pruned = ledger.prune()
    assert pruned > 10
    assert answers() == before
    later = ledger.fence_offset(25_500)
    assert fence is not None and later is not None and later >= fence
    assert ledger.prune() == 0  # nothing more to drop
    # Progress rows of pruned ENDs went with them.
    rows = ledger.ch.rows(f"SELECT count() AS n FROM {ledger.progress}")
    assert int(rows[0]["n"]) < 30


def test_rows_to_keep() -> None:
    rows = [
        (1, A, True),
        (1, B, True),
        (3, A, True),
        (5, B, False),
        (7, A, True),
        (9, A, True),
        (11, "c", False),
        (13, A, True),
    ]
    # incomplete: 5, 11; newest before 5: 3 (a), 1 (b); before 11: 9 (a), 1 (b);
    # newest of all: 13 (a), 1 (b), 11 (c)
    assert rows_to_keep(rows) == {1, 3, 5, 9, 11, 13}


def test_a_ledger_of_the_earlier_layout_is_carried_over(engine: ChdbBackend) -> None:
    """Before the spans, the ledger was `transactions` and `transaction_progress`, keyed by xid:
    its ENDs and counts still count after the upgrade (a transaction in flight completes)."""
    database = f"ledger_test_{next(_databases)}"
    engine.execute(f"CREATE DATABASE {database}")
    engine.execute(
        f"CREATE TABLE {database}.transactions (tx_id String, lsn UInt64, `offset` Int64, "
        "data_collection String, expected UInt64, commit_ms Int64 DEFAULT 0) "
        "ENGINE = ReplacingMergeTree ORDER BY (tx_id, data_collection)"
    )
    engine.execute(
        f"CREATE TABLE {database}.transaction_progress (tx_id String, data_collection String, "
        "applied UInt64, dead_lettered UInt64) ENGINE = SummingMergeTree "
        "ORDER BY (tx_id, data_collection)"
    )
    engine.execute(
        f"INSERT INTO {database}.transactions VALUES ('5', 500, 1, 'public.a', 1, 0), "
        "('6', 600, 3, 'public.a', 2, 0)"
    )
    engine.execute(
        f"INSERT INTO {database}.transaction_progress VALUES ('5', 'public.a', 1, 0), "
        "('6', 'public.a', 1, 0)"
    )
    ledger = TransactionLedger(engine, database, "replica")
    ledger.create()
    ledger.create()  # again: copied once
    mark = ledger.watermark([A])
    assert mark is not None and mark.offset == 1
    applied(ledger, A, "6:590")  # the second event of xid 6 arrives after the upgrade
    mark = ledger.watermark([A])
    assert mark is not None and mark.offset == 3


def test_rows_to_keep_answers_every_watermark_as_the_whole_ledger_does() -> None:
    """Random ledgers: the kept rows give every set of tables the same watermark (the newest END
    on the set before its first incomplete one), and the same newest END of any table before
    it, as all rows do."""
    import random

    def watermark(rows: list[tuple[int, str, bool]], tables: set[str]) -> tuple[int | None, ...]:
        on = [r for r in rows if r[1] in tables]
        first = min((o for o, _, done in on if not done), default=None)
        before = [o for o, _, _ in on if first is None or o < first]
        anything = [o for o, _, _ in rows if first is None or o < first]
        return (max(before, default=None), max(anything, default=None), first)

    generator = random.Random(7)
    names = ["a", "b", "c", "d"]
    for _ in range(300):
        rows = []
        for offset in range(1, generator.randint(1, 40) * 2, 2):
            for name in generator.sample(names, generator.randint(1, 3)):
                rows.append((offset, name, generator.random() > 0.15))
        kept = rows_to_keep(rows)
        pruned = [r for r in rows if r[0] in kept]
        for size in (1, 2, 3, 4):
            for tables in itertools.combinations(names, size):
                assert watermark(pruned, set(tables)) == watermark(rows, set(tables)), (
                    rows,
                    tables,
                )


def applied_in_order(ledger: TransactionLedger, collection: str, *events: tuple[str, int]) -> None:
    """One batch applying change events (Debezium transaction id, data_collection_order)."""
    counts: dict[tuple[str, str], EventSpan] = {}
    for tx_id, order in events:
        xid, span = EventPlace(tx_id, order).span()
        key = (xid, collection)
        counts[key] = counts[key] + span if key in counts else span
    ledger.record_progress(batch(), counts)


def test_an_end_kafka_holds_twice_counts_once(ledger: TransactionLedger) -> None:
    """Kafka Connect restarted: Debezium sent the ENDs of xids 20 and 21 again, after the END
    of xid 22 (and BEGINs between). The copies are not transactions of their own: the watermark
    passes them once the transactions are complete, and nothing waits for them."""
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            end(1, 20, 2000, public__a=2),
            end(3, 21, 2100, public__a=1),
            end(5, 22, 2200, public__a=1),
        ],
    )
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            (6, {"status": "BEGIN", "id": "20:1990"}),
            end(7, 20, 2000, public__a=2),
            end(9, 21, 2100, public__a=1),
            end(11, 23, 2300, public__a=1),
        ],
    )
    applied_in_order(ledger, A, ("20:1990", 1), ("20:1995", 2), ("21:2090", 1))
    applied_in_order(ledger, A, ("22:2190", 1), ("20:1990", 1), ("20:1995", 2))  # sent again
    applied_in_order(ledger, A, ("21:2090", 1), ("23:2290", 1))  # sent again, then new
    mark = ledger.watermark([A])
    assert mark is not None and (mark.offset, mark.tx_id) == (11, "23")
    assert ledger.first_incomplete([A], -1) == {}
    assert ledger.unfinished(11, r"cdc\.public\..*", "cdc") is None
    recorded = ledger.ch.rows(f"SELECT count() AS n FROM {ledger.ends} FINAL")
    assert int(recorded[0]["n"]) == 4  # 20, 21, 22, 23: the copies were not recorded


def test_an_event_kafka_holds_twice_does_not_complete_its_transaction(
    ledger: TransactionLedger,
) -> None:
    """Three events of xid 30 on a; the first two were sent twice (a Connect restart between
    them and the third). Four events arrived, yet the transaction is complete only once its
    third event is applied: events count once, by their place in the transaction."""
    ledger.record_ends(batch("cdc.transaction"), [end(1, 30, 3000, public__a=3)])
    applied_in_order(ledger, A, ("30:2900", 1), ("30:2910", 2))
    applied_in_order(ledger, A, ("30:2900", 1), ("30:2910", 2))  # sent again: another batch
    assert ledger.watermark([A]) is None
    gap = ledger.unfinished(1, r"cdc\.public\..*", "cdc")
    assert gap is not None and (gap.expected, gap.settled) == (3, 2)
    applied_in_order(ledger, A, ("30:2920", 3))
    mark = ledger.watermark([A])
    assert mark is not None and mark.offset == 1
    assert ledger.unfinished(1, r"cdc\.public\..*", "cdc") is None


def test_a_dead_letter_applied_by_a_replay_is_settled_once(ledger: TransactionLedger) -> None:
    """Event 2 of xid 40 was dead-lettered, then `projector dlq replay` applied it: it is
    applied (the watermark passes) and settled once, not twice."""
    ledger.record_ends(batch("cdc.transaction"), [end(1, 40, 4000, public__a=2)])
    _, first = EventPlace("40:3900", 1).span()
    _, second = EventPlace("40:3910", 2).span()
    ledger.record_progress(batch(), {("40", A): first}, {("40", A): second})
    assert ledger.watermark([A]) is None
    assert ledger.unfinished(1, r"cdc\.public\..*", "cdc") is None  # settled: 2 of 2
    ledger.record_progress(batch(), {("40", A): second}, projection="dlq-replay")
    rows = ledger.ch.rows(f"SELECT settled, applied FROM {ledger._settled('1')}")
    assert [(int(r["applied"]), int(r["settled"])) for r in rows] == [(2, 2)]
    mark = ledger.watermark([A])
    assert mark is not None and mark.offset == 1


def test_pruning_a_backlog_larger_than_a_statement(ledger: TransactionLedger) -> None:
    """A projector that starts 12,000 single-row transactions behind: the first prune deletes
    more ENDs and spans than one statement of ClickHouse (max_query_size, 262,144 bytes by
    default) could name, and keeps every answer."""
    transactions = 12_000
    ends = [
        end(2 * n + 1, 100_000 + n, 1_000_000 + 100 * n, public__a=1) for n in range(transactions)
    ]
    ledger.record_ends(batch("cdc.transaction"), ends)
    events = [(f"{100_000 + n}:{1_000_000 + 100 * n - 50}", 1) for n in range(transactions - 1)]
    applied_in_order(ledger, A, *events)  # all but the last one complete
    # What the spans' keys alone would take in one statement:
    key_bytes = sum(
        len(f"('{100_000 + n}', '{A}', {1_000_000 + 100 * n - 50}, {1_000_000 + 100 * n - 50}), ")
        for n in range(transactions)
    )
    limit = ledger.ch.rows("SELECT getSetting('max_query_size') AS n")[0]["n"]
    assert key_bytes > int(limit)
    before = (ledger.watermark([A]), ledger.first_incomplete([A], -1), ledger.newest_end())
    assert before[0] is not None and before[0].offset == 2 * (transactions - 2) + 1
    assert ledger.prune() == transactions - 2  # the last complete one and the incomplete stay
    assert (ledger.watermark([A]), ledger.first_incomplete([A], -1), ledger.newest_end()) == before
    spans = ledger.ch.rows(f"SELECT count() AS n FROM {ledger.progress}")
    assert int(spans[0]["n"]) == 1


def test_literal_lists_are_cut_by_bytes() -> None:
    values = [f"'{'x' * (n % 50)}'" for n in range(10_000)]
    groups = list(literal_chunks(values, budget=1000))
    assert [v for g in groups for v in g] == values  # all of them, in order
    assert all(len(", ".join(g).encode()) <= 1000 for g in groups)
    assert len(groups) > 100
    assert list(literal_chunks(["a" * 5000, "b"], budget=1000)) == [["a" * 5000], ["b"]]


def test_spans_from_before_the_orders_still_count_after_the_upgrade(engine: ChdbBackend) -> None:
    """A ledger written before events carried their order: an event counted then and one
    counted after the upgrade (with its order) make the transaction complete."""
    database = f"ledger_test_{next(_databases)}"
    engine.execute(f"CREATE DATABASE {database}")
    engine.execute(
        f"CREATE TABLE {database}.transaction_events (tx_id String, data_collection String, "
        "first_lsn UInt64, last_lsn UInt64, applied UInt64, dead_lettered UInt64) "
        "ENGINE = SummingMergeTree ORDER BY (tx_id, data_collection, first_lsn, last_lsn)"
    )
    engine.execute(
        f"INSERT INTO {database}.transaction_events VALUES ('50', 'public.a', 4900, 4900, 1, 0)"
    )
    ledger = TransactionLedger(engine, database, "replica")
    ledger.create()
    ledger.record_ends(batch("cdc.transaction"), [end(1, 50, 5000, public__a=2)])
    assert ledger.watermark([A]) is None  # one of two
    applied_in_order(ledger, A, ("50:4950", 2))
    mark = ledger.watermark([A])
    assert mark is not None and mark.offset == 1


def test_a_replayed_end_takes_its_place_from_a_copy_recorded_later(
    ledger: TransactionLedger,
) -> None:
    """The END of xid 61 at offset 3 could not be read (dead-lettered); Connect sent it again
    and the copy was recorded at offset 9. `dlq replay` records it at 3, its place in commit
    order, and the copy goes: one END, complete once its event is applied."""
    ledger.record_ends(
        batch("cdc.transaction"),
        [
            end(1, 60, 6000, public__a=1),
            (3, None),
            end(5, 62, 6200, public__b=1),
        ],
    )
    ledger.record_ends(batch("cdc.transaction"), [end(9, 61, 6100, public__a=1)])
    applied(ledger, A, "60:5990", "61:6090")
    applied(ledger, B, "62:6190")
    mark = ledger.watermark([A, B])
    assert mark is not None and mark.offset == 1  # the unreadable END holds it
    replay = BatchRange("cdc.transaction", 0, 3, 3)  # the letter's own range
    ledger.record_ends(replay, [end(3, 61, 6100, public__a=1)], projection="dlq-replay")
    ledger.forget_unreadable(3)
    rows = ledger.ch.rows(f"SELECT `offset` AS o FROM {ledger.ends} FINAL WHERE tx_id = '61'")
    assert [int(r["o"]) for r in rows] == [3]
    mark = ledger.watermark([A, B])
    assert mark is not None and mark.offset == 5


def test_a_replayed_end_is_recorded_under_a_token_of_its_own(ledger: TransactionLedger) -> None:
    """The runner's batch was that one unreadable message: the replay's insert, under the same
    batch range, must not be taken for the runner's (dropped as already inserted)."""
    ledger.record_ends(batch("cdc.transaction"), [end(1, 70, 7000, public__a=1)])
    applied(ledger, A, "70:6990")
    only = BatchRange("cdc.transaction", 0, 3, 3)
    ledger.record_ends(only, [(3, None)])
    ledger.record_ends(only, [end(3, 71, 7100, public__a=1)], projection="dlq-replay")
    ledger.forget_unreadable(3)
    assert ledger.first_incomplete([A], -1) == {A: 3}  # recorded, and waiting for its event
    applied(ledger, A, "71:7090")
    mark = ledger.watermark([A])
    assert mark is not None and mark.offset == 3
