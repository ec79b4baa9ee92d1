"""Where a read model's source tables stand for readers: the consistency LSN of a group of tables,
kept up to date from the transaction ledger (the argument: projector/commit/ledger.py's
docstring, "Read-your-writes").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from projector.commit.ledger import TransactionLedger
from projector.commit.transactions import RecordedEnd, Watermark, lsn_text


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


@dataclass(frozen=True)
class Ceiling:
    """How far something that follows the replicas has followed them (the read models' stage,
    projector/read_models/stage.py): every transaction on its tables that committed at or before
    `lsn` is reflected. `end_offset`: the transaction-topic offset of the newest END at or
    before `lsn` (-1: none)."""

    lsn: int
    end_offset: int
    commit_ms: int


def capped(
    consistency: Consistency,
    ceiling: Ceiling | None,
    ledger: TransactionLedger,
    tables: Sequence[str],
) -> Consistency:
    """A read model's position: its source tables' (`consistency`), but no further than the
    stage that keeps it has followed them (None: nothing reflected yet). The watermark is then
    the newest END on the tables at or before the ceiling: every transaction up to the ceiling is
    complete on every source table, or the ceiling would be lower."""
    if ceiling is None:
        return NOTHING_KNOWN
    if consistency.lsn <= ceiling.lsn:
        return consistency
    watermark = consistency.watermark
    if watermark is None or watermark.lsn > ceiling.lsn:
        mark = ledger.newest_end(-1, ceiling.end_offset + 1, tables)
        watermark = mark.watermark() if mark is not None else None
    return Consistency(ceiling.lsn, ceiling.commit_ms, watermark, "the read models' stage")


def ceiling_of(
    ledger: TransactionLedger, groups: Mapping[str, Sequence[str]]
) -> Callable[[], dict[str, Ceiling]]:
    """Where each group of tables stands for readers, as a ceiling (what the read models'
    stage reaches once it has recomputed every range the replicas applied by now)."""
    tracker = ConsistencyTracker(ledger, groups)

    def current() -> dict[str, Ceiling]:
        ceilings, ends = {}, {0: -1}  # the END of an LSN, looked up once
        for name, position in tracker.refresh().items():
            if position.lsn not in ends:
                end = ledger.end_at_or_before(position.lsn)
                ends[position.lsn] = -1 if end is None else end.offset
            ceilings[name] = Ceiling(position.lsn, ends[position.lsn], position.commit_ms)
        return ceilings

    return current
