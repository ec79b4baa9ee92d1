"""The work that keeps what the operators asked for: read models and replica rebuilds.

The read models are kept beside the batches, on a thread of their own (`StageRunner`): their
stage (projector/read_models/stage.py) follows what the replicas committed, so it never needs a
batch to wait, and its backfill chunks and rebuild requests run between its own ranges. A step of
a replica rebuild is a duty: it runs between batches under the rule of projector/run/duties.py
(no batch in flight, no replay pending), so it never interleaves with a batch that writes what it
reads. What each step does and why it is exact is the owners' (projector/read_models/
maintenance.py, projector/operations/replica_rebuild.py); here is only when it runs.

Transient failures are retried (the main thread's while the member keeps polling:
`MainRetries`); a rebuild step that is refused (`RebuildRefused`: its verification failed,
Debezium's snapshot failed, Kafka stopped answering a read for a minute) fails its job alone, in
`projector run` and in a chDB command alike (`projector rebuild` again starts a new job); the
pipeline goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from functools import partial
from typing import Protocol, TypeVar

from projector.errors import PartitionLost, RebuildRefused
from projector.operations.read_model_rebuild import take_requests
from projector.operations.replica_rebuild import ReplicaRebuilds, take_replica_requests
from projector.operations.replica_rebuild_jobs import CATCHING_UP, SNAPSHOT, ReplicaRebuild
from projector.operations.requests import OpsRequests
from projector.read_models.maintenance import ReadModelMaintainer
from projector.read_models.stage import ReadModelStage, lapsed
from projector.run.duties import drive_here
from projector.run.retries import TRANSIENT, with_retries

log = logging.getLogger("projector")
T = TypeVar("T")
Key = tuple[str, int]
AppliedTo = Callable[[list[Key]], dict[Key, int | None]]
READ_MODEL_CHECK_S = 3.0  # how often it looks for families whose sources now exist
IDLE_S = 0.2  # how long the holder waits for a batch to be committed when nothing is pending
STANDBY_S = 1.0  # how often a standby looks at the lease
FINISH_POLL_S = 0.2  # how often the finish line looks at the stage's position
WAITING_REPORT_S = 30.0
REPLICA_REQUEST_CHECK_S = 1.0  # how often it reads replica rebuild requests


class MainRetries(Protocol):
    def __call__(self, action: Callable[[], T], what: str) -> T: ...


class ReadModelUpkeep:
    """Starts read-model families whose sources now exist (every few seconds), takes rebuild
    requests, and builds new versions a chunk a round: the lease holder's (`StageRunner`), or
    a command's in its own process."""

    name = "keeping read models"

    def __init__(
        self,
        maintainer: ReadModelMaintainer,
        requests: OpsRequests,
        retries: MainRetries,
        on_step: Callable[[str], None] = lambda version: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_step`: called with the version that built after each backfill chunk."""
        self.maintainer, self.requests, self.retries = maintainer, requests, retries
        self.on_step, self.clock = on_step, clock
        self._next_check = 0.0

    def start(self) -> None:
        """Before anything else: a backfill chunk left open by a crash is finished first."""
        for line in self.retries(self.maintainer.family_versions.ensure, "starting read models"):
            log.info("read models: %s", line)
        for line in self.retries(self.maintainer.finish_open_backfill, "finishing a backfill"):
            log.info("read models: %s", line)

    def due(self, now: float) -> bool:
        # stays due while a version builds: a chunk a round
        return now >= self._next_check

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
            return  # the next chunk on the next round, between ranges
        self._next_check = self.clock() + READ_MODEL_CHECK_S

    def finish(self) -> None:
        """Every read model whose sources exist is started and built."""
        while True:
            self._next_check = 0.0
            self.run()
            if not self.maintainer.building:
                return


class StageRunner:
    """The read models' stage on a thread of its own (projector/read_models/stage.py): it keeps
    or takes the lease, and while it holds it recomputes what the replicas committed (woken by
    each committed batch, `poke`), then the upkeep's round (families started, rebuild requests,
    a backfill chunk). A standby looks at the lease every `STANDBY_S`.

    It runs beside the batches: the stage reads the replicas' committed ranges and writes only
    the read models, which no batch writes; recomputing a key from the replicas is exact
    whatever a batch in flight has written of a later range (that range is recomputed in turn).
    Transient failures are retried; a lost lease makes it a standby; anything else is a bug
    that stops the run (`failure`, raised by the run loop), never a silently stale read model."""

    def __init__(
        self,
        stage: ReadModelStage,
        requests: OpsRequests,
        observe: Callable[[str, float], None] = lambda table, seconds: None,
    ) -> None:
        """`observe`: the seconds one range of a table took (the metrics)."""
        self.stage = stage
        self.upkeep = ReadModelUpkeep(stage.maintainer, requests, call_directly)
        self.observe = observe
        self.failure: BaseException | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._rounds = 0  # upkeep rounds run (each starts the families whose sources exist)
        self._rounds_wanted = 0  # by the finish line
        self._thread = threading.Thread(target=self._loop, name="read-models", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """A batch was committed: look for its range now."""
        self._wake.set()

    def stop(self) -> None:
        """After the range in progress; the lease is released for a standby to take at once."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        try:
            self.stage.lease.release()
        except TRANSIENT as exc:  # it lapses on its own
            log.warning("read models: could not release the lease: %s", exc)

    def finish(self, stopping: Callable[[], bool]) -> None:
        """At the finish line: wait until the read models have recomputed everything the
        replicas applied, every family whose sources exist is started (a round of the upkeep
        after now) and none builds — by this process's stage, or another live holder's."""
        wanted = self._rounds + 1
        waited_since = time.monotonic()
        while not stopping():
            if self.failure is not None:
                raise self.failure
            self._rounds_wanted = wanted
            self.poke()
            lease = self.stage.lease
            if lease.held is not None:
                ready = self._rounds >= wanted
            else:
                holder, age = with_retries(lease.newest, "reading the read models' lease")
                ready = holder is not None and not lapsed(holder, age)
                if not ready and not lease.may_hold:
                    log.warning("read models: nobody maintains them; not waiting for them")
                    return
            if ready and with_retries(self.stage.caught_up, "reading the read models' position"):
                return
            if time.monotonic() - waited_since > WAITING_REPORT_S:
                log.info("read models: waiting for the stage to catch up")
                waited_since = time.monotonic()
            time.sleep(FINISH_POLL_S)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = with_retries(self._round, "keeping read models", stop=self._stopped)
            except PartitionLost:
                self.stage.lost()
                busy = False
            except TRANSIENT:
                busy = False  # stopping while ClickHouse is away
            except Exception as exc:  # a bug: the run stops (the loop raises it)
                log.exception("read models: the stage failed")
                self.failure = exc
                return
            if not busy:
                self._wake.wait(IDLE_S if self.stage.lease.held else STANDBY_S)
                self._wake.clear()

    def _stopped(self) -> bool:
        return self._stopping

    def _round(self) -> bool:
        """Whether there is more to do right away."""
        stage = self.stage
        if not stage.hold():
            return False
        pending, ceiling = stage.start_pass()
        for work in pending:
            if self._stopping or not stage.hold():
                return False
            started = time.monotonic()
            stage.step(work)
            self.observe(work.table, time.monotonic() - started)
        stage.end_pass(ceiling)
        if self._rounds < self._rounds_wanted or self.upkeep.due(time.monotonic()):
            self.upkeep.run()
            self._rounds += 1
            return bool(pending) or stage.maintainer.building
        return bool(pending)


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
