"""The duties that keep what the operators asked for: read models and replica rebuilds.

Both run between batches under the rule of projector/run/duties.py (no batch in flight, no
replay pending), which is what makes them exact: a backfill chunk of a read model, and a step of
a replica rebuild, never interleave with a batch that writes what they read. What each step does
and why it is exact is the owners' (projector/read_models/maintenance.py and
projector/operations/replica_rebuild.py); here is only when it runs.

Transient failures are retried while the member keeps polling (`MainRetries`); a rebuild that is
refused fails alone.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from functools import partial
from typing import Protocol, TypeVar

from projector.errors import RebuildRefused
from projector.operations.read_model_rebuild import take_requests
from projector.operations.replica_rebuild import ReplicaRebuilds, take_replica_requests
from projector.operations.replica_rebuild_jobs import ReplicaRebuild
from projector.operations.requests import OpsRequests
from projector.read_models.maintenance import ReadModelMaintainer
from projector.run.retries import TRANSIENT

log = logging.getLogger("projector")
T = TypeVar("T")
Key = tuple[str, int]
AppliedTo = Callable[[list[Key]], dict[Key, int | None]]
READ_MODEL_CHECK_S = 3.0  # how often it looks for families whose sources now exist
REPLICA_REQUEST_CHECK_S = 1.0  # how often it reads replica rebuild requests


class MainRetries(Protocol):
    def __call__(self, action: Callable[[], T], what: str) -> T: ...


class ReadModelUpkeep:
    """Starts read-model families whose sources now exist (every few seconds), takes rebuild
    requests, and builds new versions a chunk a round."""

    name = "keeping read models"

    def __init__(
        self,
        maintainer: ReadModelMaintainer,
        requests: OpsRequests,
        retries: MainRetries,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maintainer, self.requests, self.retries, self.clock = (
            maintainer,
            requests,
            retries,
            clock,
        )
        self._next_check = 0.0

    def start(self) -> None:
        """Before any batch: a backfill chunk left open by a crash is finished before anything
        else changes what it read (replay first)."""
        self.run()
        for line in self.retries(self.maintainer.finish_open_backfill, "finishing a backfill"):
            log.info("read models: %s", line)

    def due(self, now: float) -> bool:
        return now >= self._next_check  # stays due while a version builds: a chunk a round

    def run(self) -> None:
        maintainer = self.maintainer
        for line in self.retries(maintainer.family_versions.ensure, "starting read models"):
            log.info("read models: %s", line)
        taken = self.retries(
            partial(take_requests, self.requests, maintainer), "taking rebuild requests"
        )
        for line in taken:
            log.info("read models: %s", line)
        if maintainer.building:
            progress = self.retries(maintainer.backfill_step, "backfilling read models")
            if progress is not None:
                log.info("read models: %s", progress)
            return  # the next chunk on the next round, between batches
        self._next_check = self.clock() + READ_MODEL_CHECK_S

    def finish(self) -> None:
        """At the finish line: every read model whose sources exist is started and built."""
        while True:
            self._next_check = 0.0
            self.run()
            if not self.maintainer.building:
                return


class ReplicaRebuildJobs:
    """Takes replica-table rebuild requests (once a second) and moves every rebuild job whose
    topic this member holds whole a step (projector/operations/replica_rebuild.py)."""

    name = "rebuilding replica tables"

    def __init__(
        self,
        rebuilds: ReplicaRebuilds,
        requests: OpsRequests,
        applied_to: AppliedTo,
        held_topics: Callable[[], Collection[str]],
        retries: MainRetries,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rebuilds, self.requests, self.applied_to = rebuilds, requests, applied_to
        self.held_topics, self.retries, self.clock = held_topics, retries, clock
        self._jobs: list[ReplicaRebuild] = []
        self._requests_pending = False
        self._next_request_check = 0.0

    def due(self, now: float) -> bool:
        if now >= self._next_request_check:
            self._next_request_check = now + REPLICA_REQUEST_CHECK_S
            try:
                pending = self.requests.pending()
                self._jobs = self.rebuilds.job_store.jobs()
            except TRANSIENT:
                return False  # looked at on a later round
            self._requests_pending = any("." in r.target for r in pending)
        return self._requests_pending or bool(self._steppable())

    def run(self) -> None:
        if self._requests_pending:
            self._requests_pending = False
            lines = self.retries(
                partial(take_replica_requests, self.requests, self.rebuilds, self.applied_to),
                "taking replica rebuild requests",
            )
            for line in lines:
                log.info("replica rebuild: %s", line)
            self._jobs = self.retries(self.rebuilds.job_store.jobs, "reading replica rebuilds")
        for job in self._steppable():
            self._step(job)

    def _steppable(self) -> list[ReplicaRebuild]:
        """The jobs whose topic this member holds whole."""
        held: dict[str, int] = defaultdict(int)
        for topic in self.held_topics():
            held[topic] += 1
        return [
            job
            for job in self._jobs
            if held.get(job.topic) and held[job.topic] == len(self.rebuilds.topics.partitions(job.topic))
        ]

    def _step(self, job: ReplicaRebuild) -> None:
        rebuilds = self.rebuilds
        try:
            caught_up = self.retries(
                partial(rebuilds.step, job, self.applied_to), "rebuilding a replica"
            )
        except RebuildRefused as exc:  # the job fails, never the pipeline
            log.error("replica rebuild of %s failed: %s", job.table, exc)
            self.retries(partial(rebuilds.fail, job, str(exc)), "recording a failed rebuild")
            rebuilds.forget(job)
            self._jobs = [j for j in self._jobs if j is not job]
            return
        swapped = self.retries(
            partial(rebuilds.finish_step, job, caught_up), "swapping a replica"
        )
        if swapped is not None:
            log.info("replica rebuild: %s", swapped)
