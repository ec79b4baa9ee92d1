"""The consistency LSN (projector/commit/ledger.py `ConsistencyTracker`) and the result cache keyed
by it (queries/cache.py), with an in-memory ledger."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from projector.commit.consistency import ConsistencyTracker
from projector.commit.transactions import RecordedEnd, parse_lsn
from queries.cache import CacheKey, ResultCache


@dataclass
class End:
    offset: int
    tx_id: str
    lsn: int
    events: dict[str, int]  # collection -> events expected
    applied: dict[str, int] = field(default_factory=dict)
    commit_ms: int = 0


class MemoryLedger:
    """The two ledger reads the tracker uses, over a list of ENDs (what the SQL computes)."""

    def __init__(self) -> None:
        self.ends: list[End] = []
        self.reads = 0

    def end(self, tx: str, lsn: int, events: dict[str, int], applied: bool = True) -> End:
        offset = 2 * len(self.ends) + 1  # BEGINs sit between ENDs on the topic
        end = End(offset, tx, lsn, events, dict(events) if applied else {}, 1000 + offset)
        self.ends.append(end)
        return end

    def newest_end(
        self, after: int = -1, before: int | None = None, collections: Sequence[str] | None = None
    ) -> RecordedEnd | None:
        self.reads += 1
        found = [
            e
            for e in self.ends
            if e.offset > after
            and (before is None or e.offset < before)
            and (collections is None or set(e.events) & set(collections))
        ]
        if not found:
            return None
        e = found[-1]
        return RecordedEnd(e.offset, e.tx_id, e.lsn, e.commit_ms)

    def first_incomplete(self, collections: Sequence[str], after: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.ends:
            if e.offset <= after:
                continue
            for c, n in e.events.items():
                if c in collections and e.applied.get(c, 0) < n:
                    out.setdefault(c, e.offset)
        return out


GROUPS = {"summary": ["shop.orders", "shop.order_items"], "statuses": ["shop.orders"]}


def tracker(ledger: MemoryLedger) -> ConsistencyTracker:
    return ConsistencyTracker(ledger, GROUPS)  # type: ignore[arg-type]


def test_nothing_recorded_means_nothing_known() -> None:
    positions = tracker(MemoryLedger()).refresh()
    assert all(p.lsn == 0 and p.watermark is None for p in positions.values())


def test_all_complete_stands_at_the_newest_end_of_any_table() -> None:
    ledger = MemoryLedger()
    ledger.end("10", 100, {"shop.orders": 1, "shop.order_items": 2})
    ledger.end("11", 200, {"debezium.heartbeat": 1}, applied=False)  # never projected
    positions = tracker(ledger).refresh()
    # A writer whose LSN is 150 (after its commit at 100, before the heartbeat) is served.
    assert positions["summary"].lsn == 200
    assert positions["summary"].watermark is not None
    assert positions["summary"].watermark.tx_id == "10"
    assert positions["summary"].waiting_for is None


def test_an_incomplete_transaction_holds_its_tables_just_before_it() -> None:
    ledger = MemoryLedger()
    ledger.end("10", 100, {"shop.orders": 1})
    items = ledger.end("11", 200, {"shop.order_items": 3}, applied=False)
    ledger.end("12", 300, {"shop.orders": 1})
    ledger.end("13", 400, {"debezium.heartbeat": 1})
    track = tracker(ledger)
    positions = track.refresh()
    assert positions["summary"].lsn == 199
    assert positions["summary"].waiting_for == "11"
    assert positions["summary"].watermark.tx_id == "10"  # type: ignore[union-attr]
    assert positions["summary"].commit_ms == ledger.ends[0].commit_ms
    # Tables the incomplete transaction did not touch are not held back by it.
    assert positions["statuses"].lsn == 400
    assert positions["statuses"].watermark.tx_id == "12"  # type: ignore[union-attr]

    items.applied = {"shop.order_items": 3}  # the rest of its events applied
    positions = track.refresh()
    assert positions["summary"].lsn == 400
    assert positions["summary"].watermark.tx_id == "12"  # type: ignore[union-attr]


def test_a_refresh_reads_from_where_every_group_was_settled() -> None:
    ledger = MemoryLedger()
    for i in range(50):
        ledger.end(str(i), 100 + i, {"shop.orders": 1})
    track = tracker(ledger)
    track.refresh()
    ledger.end("late", 1000, {"shop.orders": 1}, applied=False)
    positions = track.refresh()
    assert positions["statuses"].lsn == 999
    assert positions["statuses"].watermark.tx_id == "49"  # type: ignore[union-attr]


def test_a_refresh_with_nothing_new_costs_one_read() -> None:
    ledger = MemoryLedger()
    ledger.end("1", 100, {"shop.orders": 1})
    track = tracker(ledger)
    track.refresh()
    ledger.reads = 0
    assert track.refresh()["statuses"].lsn == 100
    assert ledger.reads == 1
    ledger.end("2", 200, {"shop.orders": 1})
    assert track.refresh()["statuses"].lsn == 200


def test_lsn_spelling_round_trips() -> None:
    assert parse_lsn("0/1E088A0") == 0x1E088A0
    assert parse_lsn("1/0") == 1 << 32
    for bad in ("", "1E088A0", "0/", "x/1", "0/1/2", "123456789/0"):
        try:
            parse_lsn(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def key(lsn: int, query: str = "q") -> CacheKey:
    return CacheKey(query, (("id", "1"),), (100, 0), "rows", lsn)


def test_the_cache_answers_only_at_the_same_watermark() -> None:
    cache: ResultCache[str] = ResultCache(10)
    cache.put(key(100), "rows at 100")
    assert cache.get(key(100)) == "rows at 100"
    assert cache.get(key(101)) is None  # the read model moved: computed again
    assert (cache.hits, cache.misses) == (1, 1)


def test_nothing_is_cached_without_a_watermark_or_when_off() -> None:
    cache: ResultCache[str] = ResultCache(10)
    cache.put(key(0), "rows")
    assert cache.get(key(0)) is None
    off: ResultCache[str] = ResultCache(0)
    off.put(key(5), "rows")
    assert off.get(key(5)) is None


def test_the_cache_forgets_the_least_recently_used_and_the_expired() -> None:
    cache: ResultCache[str] = ResultCache(2, ttl_s=60)
    cache.put(key(1, "a"), "a")
    cache.put(key(1, "b"), "b")
    assert cache.get(key(1, "a")) == "a"
    cache.put(key(1, "c"), "c")  # b was used least recently
    assert cache.get(key(1, "b")) is None
    assert cache.get(key(1, "a")) == "a"
    expired: ResultCache[str] = ResultCache(2, ttl_s=0.001)
    expired.put(key(1), "x")
    time.sleep(0.01)
    assert expired.get(key(1)) is None
