"""Read-your-writes for the query service: where each read model stands, and waiting for a
writer's LSN.

The consistency LSN of a read model (the argument is in projector/commit/ledger.py) is computed by
`ConsistencyTracker` over the model's source tables, and capped where the read models' stage has
followed them (projector/read_models/stage.py: a materialized read model lags its replicas). `ReadPositions` shares one tracker between
all requests of a process: it refreshes it at most every `max_age_s` (one refresh at a time; the
others read the result), and `wait_for` polls it until a read model has reached a writer's LSN or
the time is up. A query over several read models stands where the least advanced of them stands.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from projector.commit.consistency import (
    NOTHING_KNOWN,
    Ceiling,
    Consistency,
    ConsistencyTracker,
    capped,
)
from projector.commit.ledger import TransactionLedger
from projector.read_models.versions import failed_read_models

log = logging.getLogger("queries")


class ReadModelHealth:
    """Which read models have failed (projector/read_models/versions.py `failed_read_models`),
    read at most every `max_age_s`; a read that fails (no versions table yet, ClickHouse away)
    keeps what was known."""

    def __init__(self, ch: Any, control_database: str, max_age_s: float = 1.0) -> None:
        self.ch, self.control_database, self.max_age_s = ch, control_database, max_age_s
        self._failed: dict[str, str] = {}
        self._read = -math.inf
        self._lock = threading.Lock()

    def failure(self, read_models: Sequence[str]) -> str | None:
        """Why one of `read_models` has failed, or None."""
        with self._lock:
            if time.monotonic() - self._read >= self.max_age_s:
                try:
                    self._failed = failed_read_models(self.ch, self.control_database)
                except Exception as exc:
                    log.debug("read model states not read: %s", exc)
                self._read = time.monotonic()
            failed = dict(self._failed)
        reasons = [f"{m}: {failed[m]}" for m in read_models if m in failed]
        return "; ".join(reasons) or None


class ReadPositions:
    def __init__(
        self,
        ledger: TransactionLedger,
        sources: dict[str, list[str]],
        ceilings: Callable[[], dict[str, Ceiling]] | None = None,
        max_age_s: float = 0.1,
        poll_s: float = 0.05,
    ) -> None:
        """`sources`: per read model, its source tables as `schema.table`; `ceilings`: per read
        model, how far the read models' stage has followed them (None: the read models are not
        materialized, they stand where their sources stand)."""
        self.ledger, self.sources, self.ceilings = ledger, sources, ceilings
        self.tracker = ConsistencyTracker(ledger, sources)
        self.positions: dict[str, Consistency] = dict(self.tracker.current)
        self.max_age_s = max_age_s
        self.poll_s = poll_s
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self._trouble: str | None = None

    def current(self, fresh: bool = False) -> dict[str, Consistency]:
        """Every read model's position, refreshed if older than `max_age_s` (or `fresh`)."""
        if fresh or time.monotonic() - self._refreshed >= self.max_age_s:
            with self._lock:  # one refresh at a time; who waited for it reads its result
                if fresh or time.monotonic() - self._refreshed >= self.max_age_s:
                    self._refresh()
        return self.positions

    def _refresh(self) -> None:
        try:
            positions = dict(self.tracker.refresh())
            if self.ceilings is not None:
                ceilings = self.ceilings()
                for name, tables in self.sources.items():
                    positions[name] = capped(
                        positions[name], ceilings.get(name), self.ledger, tables
                    )
            self.positions = positions
        except Exception as exc:  # no ledger yet, ClickHouse away: positions stay as they were
            if self._trouble is None:
                log.warning("read positions not refreshed (they stay where they were): %s", exc)
            self._trouble = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            if self._trouble is not None:
                log.warning("read positions refreshed again")
            self._trouble = None
        self._refreshed = time.monotonic()

    def of(self, read_models: Sequence[str], fresh: bool = False) -> Consistency:
        """Where a query over `read_models` stands: the least advanced of them."""
        positions = self.current(fresh)
        found = [positions.get(name, NOTHING_KNOWN) for name in read_models]
        return min(found, key=lambda c: c.lsn) if found else NOTHING_KNOWN

    def of_now(self, read_models: Sequence[str]) -> Consistency | None:
        """`of` without refreshing: None when a refresh is due (the caller then takes the path
        that refreshes; an event loop must not wait for ClickHouse)."""
        if time.monotonic() - self._refreshed >= self.max_age_s:
            return None
        positions = self.positions
        found = [positions.get(name, NOTHING_KNOWN) for name in read_models]
        return min(found, key=lambda c: c.lsn) if found else NOTHING_KNOWN

    def wait_for(self, read_models: Sequence[str], lsn: int, timeout_s: float) -> Consistency:
        """The position once it has reached `lsn`, or the last one seen when `timeout_s` is up."""
        deadline = time.monotonic() + timeout_s
        position = self.of(read_models)
        while position.lsn < lsn and time.monotonic() < deadline:
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
            position = self.of(read_models)
        return position

    @property
    def trouble(self) -> str | None:
        """Why the last refresh failed, if it did."""
        return self._trouble
