"""Work between batches: the duties of a running projector, and the one rule they all keep.

A duty is whatever the run loop does that is not applying a batch: honouring `projector pause`,
rebuilding replica tables, reporting lag and watermarks, pruning the transaction ledger. (The
read models are kept beside the batches, on a thread of their own: projector/run/upkeep.py
`StageRunner`.) Each says
when it is due (`due`, which may look but changes nothing) and does its work (`run`). `Duties`
runs the due ones in the order the loop gave them, and enforces the rule, here and nowhere else:

**A duty runs only with no batch in flight and no replay pending.**

- No batch in flight: a duty may change what a batch reads or writes (a pause moves partitions,
  a rebuild swaps a table), so the batches
  in flight are settled first. The one exception is a report (`Chore(..., settles=False)`: lag,
  the slot, watermarks), which only reads: it runs beside the batches in flight and sees the
  positions of those settled so far (a lag a batch higher, a watermark a batch lower: never
  more than is true). Draining the loop's read-ahead every second for a lag report would leave
  ClickHouse idle while the next batch is consumed and planned.
- No replay pending: an open intent is replayed exactly before anything else changes the state it
  saw (projector/commit/checkpoint.py, step 2). While one waits, no duty runs.

How a duty fails is its own, and of two kinds:

- A **chore** (`Chore`: lag, watermarks, pruning) is a report or a clean-up: **housekeeping never
  stops ingestion.** One that fails (ClickHouse refuses its statement, a server is away, a bug) is
  logged with its reason, counted, and tried again later; the run goes on. A late chore leaves
  every replica and read model exact: a watermark reported late is lower than it could be (a
  reader waits a little longer, never sees less), a ledger pruned late is larger.
- A duty that changes state (pauses, replica rebuilds:
  projector/run/pausing.py, projector/run/upkeep.py) retries transient failures while the member
  keeps polling, and a job that is refused fails alone (`RebuildRefused`), never the run.

The commit protocol is not a duty: when it cannot go on, nothing should.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("projector")
LOG_REPEAT_S = 60.0  # a chore that keeps failing is logged once a minute, not every round
IDLE_ROUND_S = 0.05  # how long `drive_here` waits when no duty was due


class Duty(Protocol):
    name: str  # (and optionally `settles = False`: a report, run beside the batches in flight)

    def due(self, now: float) -> bool:
        """Whether it has work now (may read, changes nothing)."""
        ...

    def run(self) -> None:
        """Do the work: called with no batch in flight and no replay pending."""
        ...


@dataclass
class Duties:
    """The duties of a run, in order; `run_due` is called once a round of the loop."""

    duties: Sequence[Duty] = ()
    settle: Callable[[], None] = lambda: None  # waits for the batch in flight and takes it
    replay_pending: Callable[[], bool] = lambda: False
    clock: Callable[[], float] = time.monotonic

    def run_due(self) -> bool:
        """Run the due duties; whether any ran."""
        if self.replay_pending():
            return False
        due = [duty for duty in self.duties if duty.due(self.clock())]
        if not due:
            return False
        if any(getattr(duty, "settles", True) for duty in due):
            self.settle()
        ran = False
        for duty in due:
            # Settling can re-position a partition (a refused batch) and a duty's retries poll
            # Kafka (an assignment): either may open a replay, which then goes first.
            if self.replay_pending():
                return ran
            duty.run()
            ran = True
        return ran

    def run_now(self, action: Callable[[], None]) -> None:
        """Work that cannot wait for its turn (at the finish line), under the same rule."""
        self.settle()
        if not self.replay_pending():
            action()


def drive_here(duties: Sequence[Duty], busy: Callable[[], bool]) -> None:
    """The projector's part, done by a command in its own process where no projector runs beside
    it (chDB gives its data directory to one process): the same duties `projector run` does,
    round after round until `busy` says their work is done. No batch is ever in flight here and
    no replay pending, so the rule holds by itself."""
    rounds = Duties(duties)
    while True:
        ran = rounds.run_due()
        if not busy():
            return
        if not ran:
            time.sleep(IDLE_ROUND_S)  # nothing due yet: no busy loop of `busy` queries


@dataclass
class Chore:
    """A report or clean-up: `action` at most every `every_s` seconds (the first time after
    `first_after_s`); after a failure, again in `retry_s` (default: `every_s`)."""

    name: str
    action: Callable[[], None]
    every_s: float
    first_after_s: float = 0.0
    retry_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    failed: Callable[[str], None] = lambda name: None  # counts a failure (the metrics)
    failures: int = 0  # in a row
    settles: bool = True  # False: a report, which runs beside the batches in flight
    _due: float = field(init=False)
    _logged: float = field(init=False, default=-1e18)  # when a failure was last logged

    def __post_init__(self) -> None:
        self._due = self.clock() + self.first_after_s

    def due(self, now: float) -> bool:
        return now >= self._due

    def run(self) -> None:
        self._due = self.clock() + self.every_s
        try:
            self.action()
        except Exception as exc:  # the rule: a chore never ends the run
            self._failed(exc)
            return
        if self.failures:
            log.info("%s succeeded again after %d failure(s)", self.name, self.failures)
            self.failures = 0

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.failed(self.name)
        retry_s = self.every_s if self.retry_s is None else self.retry_s
        self._due = self.clock() + retry_s
        # The first failure with its trace (it may be a bug); then a line a minute at most.
        if self.failures == 1 or self.clock() - self._logged >= LOG_REPEAT_S:
            self._logged = self.clock()
            reason = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
            log.warning(
                "%s failed %d time(s) in a row (tried again in %.0f s; the run goes on): %s: %s",
                self.name,
                self.failures,
                retry_s,
                type(exc).__name__,
                reason,
                exc_info=exc if self.failures == 1 else None,
            )
