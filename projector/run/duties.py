"""Housekeeping between batches: the duties of a running projector that are not the commit
protocol -- lag metrics, read-model watermarks, pruning the transaction ledger.

One rule for all of them: **housekeeping never stops ingestion.** A chore that fails (ClickHouse
refuses its statement, a server is away, a bug) is logged with its reason and tried again later;
the run goes on applying batches. What a chore computes is only ever a report or a clean-up, so a
late one leaves every replica and read model exact: a watermark reported late is lower than it
could be (a reader waits a little longer, never sees less), a ledger pruned late is larger.

The commit protocol (projector/commit/checkpoint.py) is not a chore: when it cannot go on, nothing
should.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("projector")
LOG_REPEAT_S = 60.0  # a chore that keeps failing is logged once a minute, not every round


@dataclass
class Chore:
    """`action` at most every `every_s` seconds (the first time after `first_after_s`); after a
    failure, again in `retry_s` (default: `every_s`)."""

    name: str
    action: Callable[[], None]
    every_s: float
    first_after_s: float = 0.0
    retry_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    failed: Callable[[str], None] = lambda name: None  # counts a failure (the metrics)
    failures: int = 0  # in a row
    _due: float = field(init=False)
    _logged: float = field(init=False, default=-1e18)  # when a failure was last logged

    def __post_init__(self) -> None:
        self._due = self.clock() + self.first_after_s

    def run_if_due(self) -> bool:
        """Run the chore when due; False when it ran and failed."""
        now = self.clock()
        if now < self._due:
            return True
        self._due = now + self.every_s
        try:
            self.action()
        except Exception as exc:  # the rule: a chore never ends the run
            self.failures += 1
            self.failed(self.name)
            retry_s = self.every_s if self.retry_s is None else self.retry_s
            self._due = self.clock() + retry_s
            # The first failure with its trace (it may be a bug); then a line a minute at most.
            if self.failures == 1 or self.clock() - self._logged >= LOG_REPEAT_S:
                self._logged = self.clock()
                reason = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
                log.warning("%s failed %d time(s) in a row (tried again in %.0f s; the run goes "
                            "on): %s: %s", self.name, self.failures, retry_s,
                            type(exc).__name__, reason,
                            exc_info=exc if self.failures == 1 else None)  # fmt: skip
            return False
        if self.failures:
            log.info("%s succeeded again after %d failure(s)", self.name, self.failures)
            self.failures = 0
        return True


@dataclass
class Chores:
    """The chores of a run, done in order between batches."""

    chores: list[Chore] = field(default_factory=list)

    def add(self, chore: Chore) -> Chore:
        self.chores.append(chore)
        return chore

    def run_due(self) -> None:
        for chore in self.chores:
            chore.run_if_due()
