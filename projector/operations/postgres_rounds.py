"""Comparing a replica with Postgres between batches while writes go on: rounds until it agrees.

A rebuild from a snapshot (projector/operations/replica_rebuild.py, S5) and a partial re-read
(projector/operations/partial_reread.py, R4) end the same way: what the projector built is
compared with Postgres *now*, in a fresh snapshot, while the application goes on writing. A key
may differ only because its latest change is still on its way, so:

  - no round while the live table is more than `LAG_TO_VERIFY` messages behind Kafka's end (its
    keys would differ from Postgres for that reason alone, and each round costs a snapshot);
  - the first round compares everything the job covers; each later one only the keys that
    differed, `RECHECK_DELAYS_S` apart (the pipeline moved on meanwhile);
  - keys that still differ after the last delay are the job's failure, named;
  - a round that cannot run (Postgres or the comparison unavailable) is tried again after the
    first delay and is not counted.

`ComparisonRounds` holds, per job, the keys that differed, the rounds done, when the next is due
and how far the live table is behind; the comparison itself is the caller's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from projector.errors import SourceUnavailable, VerifyError

log = logging.getLogger("projector.replica_rebuild")

LAG_TO_VERIFY = 1_000  # messages the live table may be behind Kafka's end when compared
RECHECK_DELAYS_S = (1.0, 2.0, 4.0, 8.0)  # keys that differ from Postgres, compared again

# A comparison: given the keys to compare again (None: everything the job covers), the rows
# compared and the keys (verify's key texts) that differ.
Comparison = Callable[[list[str] | None], tuple[int, list[str]]]


@dataclass(frozen=True)
class Outcome:
    """A round's result: `equal` (with the rows compared), or `failed` (with why); neither:
    not settled yet (wait, or compare again)."""

    equal: bool = False
    failed: str = ""
    rows: int = 0


PENDING = Outcome()


class ComparisonRounds:
    def __init__(self, delays: tuple[float, ...] = RECHECK_DELAYS_S) -> None:
        self.delays = delays
        self._drift: dict[str, list[str]] = {}  # keys that differed, per job
        self._rounds: dict[str, tuple[int, float]] = {}  # rounds counted, when the next is due
        self._lag: dict[str, int] = {}  # messages the live table is behind Kafka's end

    def behind(self, job_id: str, messages: int) -> None:
        """How far the live table is behind Kafka's end now (no round while far behind)."""
        self._lag[job_id] = messages

    def round(self, job_id: str, table: str, compare: Comparison) -> Outcome:
        """One round for `job_id` (comparing `table`), when one is due."""
        rounds, due = self._rounds.get(job_id, (0, 0.0))
        if time.monotonic() < due or self._lag.get(job_id, 0) > LAG_TO_VERIFY:
            return PENDING  # a lagging pipeline's keys differ from Postgres: not a round
        try:
            rows, drift = compare(self._drift.get(job_id))
        except (VerifyError, SourceUnavailable) as exc:  # tried again, not counted
            log.warning("%s: cannot compare with Postgres now: %s", table, exc)
            self._rounds[job_id] = (rounds, time.monotonic() + self.delays[0])
            return PENDING
        if not drift:
            self.forget(job_id)
            return Outcome(equal=True, rows=rows)
        if rounds >= len(self.delays):
            self.forget(job_id)
            shown = "; ".join(drift[:5])
            return Outcome(
                failed=f"{len(drift)} key(s) differ from Postgres after {rounds + 1} "
                f"comparisons: {shown}"
            )
        self._drift[job_id] = drift
        self._rounds[job_id] = (rounds + 1, time.monotonic() + self.delays[rounds])
        log.info(
            "%s: %d key(s) differ from Postgres; compared again in %.0f s (writes may be on "
            "their way)",
            table,
            len(drift),
            self.delays[rounds],
        )
        return PENDING

    def forget(self, job_id: str) -> None:
        for held in (self._drift, self._rounds, self._lag):
            held.pop(job_id, None)
