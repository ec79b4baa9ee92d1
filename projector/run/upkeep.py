"""The duties that keep what the operators asked for: read models and replica rebuilds.

Both run between batches under the rule of projector/run/duties.py (no batch in flight, no
replay pending), which is what makes them exact: a backfill chunk of a read model, and a step of
a replica rebuild, never interleave with a batch that writes what they read. What each step does
and why it is exact is the owners' (projector/read_models/maintenance.py and
projector/operations/replica_rebuild.py); here is only when it runs.

Transient failures are retried while the member keeps polling (`MainRetries`); a rebuild step
that is refused (`RebuildRefused`: its verification failed, Debezium's snapshot failed, Kafka
stopped answering a read for a minute) fails its job alone, in `projector run` and in a chDB
command alike (`projector rebuild` again starts a new job); the pipeline goes on.
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
from projector.operations.replica_rebuild_jobs import CATCHING_UP, SNAPSHOT, ReplicaRebuild
from projector.operations.requests import OpsRequests
from projector.read_models.maintenance import ReadModelMaintainer
from projector.run.duties import drive_here
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
        on_step: Callable[[str], None] = lambda version: None,
        clock: Callable[[], float] = time.monotonic,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """`on_step`: called with the version that built after each backfill chunk. `ready`:
        whether this member knows its open intents yet (its partitions positioned): a backfill
        chunk must not run before a half-applied batch's replay (its deltas are exact only
        against the state that batch saw), and the duties' rule can only see a replay pending
        once the partitions are positioned."""
        self.maintainer, self.requests, self.retries = maintainer, requests, retries
        self.on_step, self.clock, self.ready = on_step, clock, ready
        self._next_check = 0.0

    def start(self) -> None:
        """Before any batch: a backfill chunk left open by a crash is finished before anything
        else changes what it read (replay first); then the first round."""
        for line in self.retries(self.maintainer.family_versions.ensure, "starting read models"):
            log.info("read models: %s", line)
        for line in self.retries(self.maintainer.finish_open_backfill, "finishing a backfill"):
            log.info("read models: %s", line)

    def due(self, now: float) -> bool:
        # stays due while a version builds: a chunk a round
        return self.ready() and now >= self._next_check

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
            building = maintainer.building_version()
            progress = self.retries(maintainer.backfill_step, "backfilling read models")
            if progress is not None:
                log.info("read models: %s", progress)
            self.on_step(building)
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
        may_step: Callable[[ReplicaRebuild], bool],
        retries: MainRetries,
        on_step: Callable[[ReplicaRebuild], None] = lambda job: None,
    ) -> None:
        """`may_step`: whether this process moves the job (`projector run`: when it holds the
        job's topic whole, `holds_whole`); `on_step`: called after each step."""
        self.rebuilds, self.requests, self.applied_to = rebuilds, requests, applied_to
        self.may_step, self.retries, self.on_step = may_step, retries, on_step
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
        return [job for job in self._jobs if self.may_step(job)]

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
        self.on_step(job)
        swapped = self.retries(partial(rebuilds.finish_step, job, caught_up), "swapping a replica")
        if swapped is not None:
            log.info("replica rebuild: %s", swapped)


def holds_whole(
    rebuilds: ReplicaRebuilds, held_partitions: Callable[[], Collection[Key]]
) -> Callable[[ReplicaRebuild], bool]:
    """A member moves a rebuild job when it holds every partition of the job's topic."""

    def may_step(job: ReplicaRebuild) -> bool:
        held: dict[str, int] = defaultdict(int)
        for topic, _ in held_partitions():
            held[topic] += 1
        return bool(held.get(job.topic)) and held[job.topic] == len(
            rebuilds.topics.partitions(job.topic)
        )

    return may_step


def keep_read_models_here(
    maintainer: ReadModelMaintainer,
    requests: OpsRequests,
    on_step: Callable[[str], None] = lambda version: None,
) -> None:
    """The read-model duty in this process, where no projector runs (chDB): the pending
    requests taken and every version built, `on_step` after each chunk."""
    upkeep = ReadModelUpkeep(maintainer, requests, call_directly, on_step)
    upkeep.start()
    drive_here([upkeep], busy=lambda: maintainer.building)


def rebuild_replicas_here(
    rebuilds: ReplicaRebuilds,
    requests: OpsRequests,
    live_next: AppliedTo,
    on_step: Callable[[ReplicaRebuild], None] = lambda job: None,
) -> None:
    """The replica-rebuild duty in this process, where no projector runs (chDB): the pending
    requests taken, and every job rebuilding from Kafka caught up, verified and swapped. A
    snapshot's job waits for `projector run`: the live table must move for its reads to arrive."""

    def from_kafka(job: ReplicaRebuild) -> bool:
        return job.state == CATCHING_UP and job.source != SNAPSHOT

    duty = ReplicaRebuildJobs(rebuilds, requests, live_next, from_kafka, call_directly, on_step)
    drive_here(
        [duty], busy=lambda: any(from_kafka(j) for j in rebuilds.job_store.jobs((CATCHING_UP,)))
    )


def call_directly(action: Callable[[], T], what: str) -> T:
    """No retries: a command in its own process lets a failure reach its operator."""
    return action()
