"""The consume → batch → apply loop behind `projector run`.

One consumer-group member: it consumes, buffers per partition, cuts batches, plans each on this
thread while the previous one applies on the apply thread, and reports metrics. Where partitions
resume, how batches are cut and replayed, and how a batch is committed are the commit protocol's
(projector/commit/checkpoint.py, steps A-C and 1-5); this loop calls it in that order.

Transient failures (ClickHouse, registry) are retried with exponential back-off and jitter,
logged once when they start and once when they clear; the batch is then applied as if nothing
happened. SIGTERM/SIGINT: the batch in progress finishes, then the loop exits 0.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)  # fmt: skip

from projector import kafka
from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import (
    PROJECTION,
    RESET,
    BatchCommitter,
    BatchRange,
    CheckpointStore,
    Resume,
    acknowledge,
    counted_ranges,
    counted_run,
    cut_batch,
)
from projector.commit.dead_letters import DeadLetter, DeadLetterStore
from projector.commit.finish_line import Finish, FinishLine
from projector.commit.ledger import EventPlace, TransactionLedger, Unfinished, Watermark
from projector.config import ProjectorConfig
from projector.errors import (
    ClickHouseUnavailable,
    KafkaUnavailable,
    PartitionLost,
    PoisonMessage,
    RebuildRefused,
    SourceUnavailable,
)
from projector.kafka import source_table_of, table_of
from projector.messages import KafkaMessages, RawMessage
from projector.metrics import ProjectorMetrics
from projector.operations.pauses import TablePauses
from projector.operations.read_model_rebuild import take_requests
from projector.operations.replica_rebuild import (
    ReplicaRebuild,
    ReplicaRebuilds,
    take_replica_requests,
)
from projector.operations.requests import OpsRequests
from projector.read_models.definitions import load_read_models
from projector.read_models.maintenance import ReadModelMaintainer, maintainer_for
from projector.replicas.apply import BatchApplier, BatchOutcome, decode
from projector.replicas.catalog import ReplicaCatalog
from projector.replicas.fast_path import FastPath, Segment
from projector.replicas.signal_table import SignalTable
from projector.replicas.snapshot_sweep import SnapshotSweep
from projector.replicas.topic_guard import TopicGuard, TopicShape
from projector.run.duties import Chore, Chores
from schemas.errors import NotConfluentFramed, RegistryUnavailable, SchemaError, UnknownSchema
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters

log = logging.getLogger("projector")
T = TypeVar("T")
TRANSIENT: tuple[type[Exception], ...] = (
    ClickHouseUnavailable, RegistryUnavailable, SourceUnavailable, KafkaUnavailable,
)  # fmt: skip
KEEP_POLLING_S = 1.0  # how often a member waiting long for its batch polls (stays in the group)
FINISH_CHECK_S = 0.5  # how often a run asked to finish looks at its finish line, at most
FIRST_WAITING_REPORT_S, WAITING_REPORT_S = 5.0, 30.0  # when it logs what it still waits for
PAUSE_CHECK_S = 1.0  # how often it reads which tables `projector pause` paused


def with_retries(
    action: Callable[[], T], what: str, stop: Callable[[], bool] = lambda: False,
    base_s: float = 0.2, cap_s: float = 30.0, sleep: Callable[[float], None] | None = None,
) -> T:  # fmt: skip
    """Run `action`, retrying transient failures with full-jitter exponential back-off (`sleep`
    waits, `time.sleep` looked up when called; the main thread's keeps polling Kafka)."""
    attempt = 0
    while True:
        try:
            result = action()
        except TRANSIENT as exc:
            if attempt == 0:
                log.warning("%s failed, retrying with back-off: %s", what, exc)
            attempt += 1
            if stop() and attempt > 3:
                raise
            (sleep or time.sleep)(random.uniform(0, min(cap_s, base_s * 2**attempt)))
            continue
        if attempt:
            log.warning("%s recovered after %d retries", what, attempt)
        return result


def offset_of(message: Message) -> int:
    """A consumed message's offset (only error events have none)."""
    offset = message.offset()
    assert offset is not None
    return offset


@dataclass
class PartitionState:
    buffer: list[Message] = field(default_factory=list)  # consumed, not yet in a batch
    replay: BatchRange | None = None  # an open intent to replay exactly
    positioned: int = 0  # times steps A-C placed it: a batch cut before the last one is stale
    high_watermark: int = 0
    # Offsets whose events the ledger counted before a `projector reset` moved the partition
    # back (checkpoint.py, R2): batches are cut at their edges and those inside count nothing.
    counted: list[tuple[int, int]] = field(default_factory=list)


class Projector:
    def __init__(self, config: ProjectorConfig, ch: ClickHouse) -> None:
        # A SIGTERM while starting (tables created, claims, Kafka clients) stops the run before
        # its first batch, cleanly, like one later.
        self.stopping = False
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.config = config
        self.schemas = SchemaCache(config.registry_url)
        self.checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
        with_retries(self.checkpoints.create, "creating the checkpoint table")
        self.committer = BatchCommitter(self.checkpoints)
        has_fast_path = hasattr(ch, "over_avro")
        # Everything a batch writes goes through the fence (checkpoint.py, step 3).
        self.ch = ch = self.committer.fenced(ch)
        self.dlq = DeadLetterStore(ch, config.control_database, PROJECTION)
        with_retries(self.dlq.create, "creating the DLQ table")
        self.ledger = TransactionLedger(ch, config.control_database, PROJECTION)
        with_retries(self.ledger.create, "creating the transaction ledger")
        self.admin = kafka.admin(config.kafka_bootstrap)
        self.guard = TopicGuard(ch, config.control_database, PROJECTION, self._describe_topic)
        with_retries(self.guard.create, "creating the topic identities")
        sweep = SnapshotSweep(ch, config.control_database, PROJECTION, self._partition_count)
        with_retries(sweep.create, "creating the snapshot bounds")
        fast_path = None
        if config.fast_path and has_fast_path:
            fast_path = FastPath(ch, config.registry_url, config.transaction_metadata)
        upcasters = Upcasters.load(config.upcasters_file)
        self.applier = BatchApplier(
            ch, self.schemas,
            ReplicaCatalog(ch, config.replica_prefix, SignalTable(config.source_dsn).request),
            PROJECTION, upcasters=upcasters, fast_path=fast_path, sweep=sweep,
        )  # fmt: skip
        # Replica tables rebuilt from Kafka or a snapshot (projector/operations/replica_rebuild.py).
        self.replica_rebuilds = ReplicaRebuilds.for_config(
            config, ch, self.schemas, upcasters, self._partition_count
        )
        with_retries(self.replica_rebuilds.create, "creating the replica rebuild table")
        self._replica_jobs: list[ReplicaRebuild] = []
        self._next_replica_request_check = 0.0
        # Read models are kept inside the batch commit (projector/read_models/maintenance.py); None when this
        # member does not keep them (config `maintain_read_models`).
        self.read_models: ReadModelMaintainer | None = maintainer_for(config, ch)
        self.read_model_list = load_read_models(config.read_models_file)
        # Rebuilds, rollbacks (projector/operations/requests.py) and pauses are asked through control tables.
        self.requests = OpsRequests(ch, config.control_database)
        with_retries(self.requests.create, "creating the ops request table")
        self.pauses = TablePauses(ch, config.control_database)
        with_retries(self.pauses.create, "creating the table pause tables")
        self._pause_wanted: set[str] = with_retries(self.pauses.wanted, "reading paused tables")
        self._paused: set[tuple[str, int]] = set()  # partitions held back by `projector pause`
        self._next_pause_check = 0.0
        self._recorded_pauses: dict[str, bool] = {}  # what this member recorded it did
        self._next_read_model_check = 0.0
        self.partitions: dict[tuple[str, int], PartitionState] = defaultdict(PartitionState)
        # The next offset to apply per assigned partition (after the last batch done).
        self.next_offset: dict[tuple[str, int], int] = {}
        self._apply_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self._in_flight: Future[BatchRange] | None = None
        self._waiting = False  # partitions paused while the main thread waits for ClickHouse
        self._unpositioned: set[tuple[str, int]] = set()  # assigned, paused: steps A-C failed
        self._last_poll = time.monotonic()
        self.metrics = ProjectorMetrics()
        # Each read model's watermark as last found: the next search starts there.
        self._watermarks: dict[str, Watermark] = {}
        # Housekeeping between batches: a failure is logged and tried again, never the end.
        self.chores = Chores()
        failed = lambda chore: self.metrics.chore_failures.labels(chore).inc()  # noqa: E731
        self.chores.add(Chore("reporting lag", self._report_lag, every_s=1, failed=failed))
        if config.transaction_metadata:
            self.chores.add(Chore("reporting watermarks", self._report_watermarks, every_s=10,
                                  failed=failed))  # fmt: skip
            self.chores.add(Chore("pruning the transaction ledger", self._prune_ledger,
                                  every_s=config.ledger_prune_interval_s,
                                  first_after_s=config.ledger_prune_interval_s,
                                  retry_s=min(60.0, config.ledger_prune_interval_s),
                                  failed=failed))  # fmt: skip
        if config.metrics_port:
            try:
                self.metrics.serve(config.metrics_port, config.metrics_host)
                log.info("metrics at http://127.0.0.1:%d/metrics", config.metrics_port)
            except OSError as exc:
                log.warning("no metrics endpoint: port %d: %s (set PROJECTOR_METRICS_PORT)",
                            config.metrics_port, exc)  # fmt: skip
        self.applied_events = 0
        self.fast_events = 0  # of which applied by the fast path
        self.dead_letters = 0
        self.consumer = kafka.consumer(
            config.kafka_bootstrap, config.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", enable_partition_eof=True,
            topic_metadata_refresh_interval_ms=2000,
            partition_assignment_strategy="cooperative-sticky",
            session_timeout_ms=config.session_timeout_ms,
            max_poll_interval_ms=config.max_poll_interval_ms,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        self.producer = kafka.producer(config.kafka_bootstrap, linger_ms=50)

    # ---- assignment --------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            resumes = self._position(keys)
        except TRANSIENT as exc:
            # Never wait for ClickHouse inside a rebalance: the whole group would wait for us.
            # The partitions wait, paused, until the main loop can position them.
            log.warning("cannot position %d assigned partition(s) yet, they wait: %s",
                        len(keys), exc)  # fmt: skip
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)
            self._unpositioned.update(keys)
            return
        consumer.incremental_assign(
            [TopicPartition(r.topic, r.partition, r.offset) for r in resumes]
        )
        # A paused table's partitions stay paused (an open intent is replayed first, then they
        # pause: nothing else is applied before it).
        paused = [TopicPartition(r.topic, r.partition) for r in resumes
                  if r.replay is None and table_of(r.topic) in self._pause_wanted]  # fmt: skip
        if paused:
            consumer.pause(paused)
            self._paused.update((tp.topic, tp.partition) for tp in paused)
        if self._waiting:  # assigned while a batch waits for ClickHouse: fetch nothing yet
            consumer.pause(consumer.assignment())

    def _position_waiting(self) -> None:
        """Position the partitions an assignment could not (ClickHouse was unavailable): one
        attempt a round, the loop polling in between."""
        if not self._unpositioned:
            return
        keys = sorted(self._unpositioned)
        try:
            resumes = self._position(keys)
        except TRANSIENT:
            return
        self._unpositioned.clear()
        waiting = [TopicPartition(topic, partition) for topic, partition in keys]
        self.consumer.incremental_unassign(waiting)
        self.consumer.incremental_assign(
            [TopicPartition(r.topic, r.partition, r.offset) for r in resumes]
        )

    def _position(self, keys: list[tuple[str, int]]) -> list[Resume]:
        """Steps A-C for `keys`: claim them, and start each from its checkpoint — unless its
        topic was re-created: the old topic's checkpoints say nothing of the new one's offsets,
        which are read from 0 (into the DLQ: the table is stopped, projector/replicas/topic_guard.py).
        One attempt: a transient failure is the caller's to retry."""
        resumes = self.committer.assign(keys)
        history = self.checkpoints.reset_history(keys)
        topics = {topic for topic, _ in keys if topic != self.config.transaction_topic}
        recreated = {topic for topic in topics if self.guard.recreated(topic)}
        for index, resume in enumerate(resumes):
            if resume.topic in recreated:
                log.error("%s was re-created: its table stops (see `projector dlq list`)",
                          resume.topic)  # fmt: skip
                self.committer.forget_checkpoint(resume.topic, resume.partition)
                resume = resumes[index] = Resume(resume.topic, resume.partition, 0, None)
            state = self.partitions[(resume.topic, resume.partition)]
            state.buffer.clear()
            state.replay = resume.replay
            state.positioned += 1
            state.counted = counted_ranges(history.get((resume.topic, resume.partition), []))
            checkpoint = self.committer.checkpoints.get((resume.topic, resume.partition))
            if checkpoint is not None and checkpoint.state == RESET:
                log.info("%s[%d]: `projector reset` moved it to offset %d; reading from there "
                         "(offsets counted before: %s)", resume.topic, resume.partition,
                         resume.offset, state.counted or "none")  # fmt: skip
            self.next_offset[(resume.topic, resume.partition)] = resume.offset
            log.info(
                "assigned %s[%d] from offset %d", resume.topic, resume.partition, resume.offset
            )
            if resume.replay is not None:
                log.info("replaying the open intent %d-%d of %s[%d] (the last run stopped inside it)",
                         resume.replay.first, resume.replay.last, resume.topic, resume.partition)  # fmt: skip
        return resumes

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The next owner starts after our last batch, not beside it — if the batch finishes in
        # time (a rebalance waits for us at most max.poll.interval.ms). If ClickHouse holds it
        # longer, we hand over anyway: the fence keeps whatever it writes later out.
        self._settle_batch(wait_s=self.config.max_poll_interval_ms / 1000 / 3, reclaim=False)
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The group already gave these partitions to others (we missed its deadline): nothing
        to wait for; a batch of theirs still in flight fails at the fence."""
        log.warning("lost %s to the group (no poll or heartbeat in time)",
                    ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))  # fmt: skip
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._unpositioned.discard((tp.topic, tp.partition))
            self._paused.discard((tp.topic, tp.partition))
            self.metrics.forget(tp.topic, tp.partition)
            self.next_offset.pop((tp.topic, tp.partition), None)
            self.partitions.pop((tp.topic, tp.partition), None)
        self.committer.release([(tp.topic, tp.partition) for tp in partitions])

    # ---- the loop ----------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(
        self,
        finish: Finish | None = None,
        tick: Callable[[], None] | None = None,
        stop_at: float | None = None,
    ) -> int:
        """Consume and apply until stopped (SIGTERM/SIGINT), past the finish line of `finish`
        (projector/commit/finish_line.py) or `stop_at` (a `time.monotonic()` instant); `tick` runs between
        rounds of batches."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Fixed now, once: a line read afresh at every check moves on (heartbeats) and is never
        # reached.
        finish_line = None if finish is None else FinishLine(finish, _RunProgress(self))
        if finish is not None:
            log.info("running until %s is applied", finish.describe())
        # Before any batch: a serving read model must see every batch, and a backfill chunk left
        # open by a crash is finished before anything else changes what it read (replay first).
        self._ensure_read_models()
        if self.read_models is not None:
            for line in with_retries(self.read_models.finish_open_backfill, "finishing a backfill"):
                log.info("read models: %s", line)
        self.consumer.subscribe(
            self.config.subscription(), on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )  # fmt: skip
        next_finish_check = time.monotonic()
        next_waiting_report = next_finish_check + FIRST_WAITING_REPORT_S
        try:
            while not self.stopping:
                fresh = self._consume(self.config.max_batch_wait_ms / 1000)
                self._flush(drain=fresh < self.config.max_batch_messages)
                if self._in_flight is not None and self._in_flight.done():
                    self._wait_for_batch()  # an idle loop still records the last batch
                self._position_waiting()
                self._honour_pauses()
                self.chores.run_due()
                self._ensure_read_models()
                self._rebuild_replicas()
                if tick is not None:
                    tick()
                now = time.monotonic()
                if stop_at is not None and now >= stop_at:
                    break
                # Checked when the poll found the buffers drained (no full backlog waiting) and
                # at most every FINISH_CHECK_S; with no batch in flight, positions are settled.
                if (finish_line is not None and fresh < self.config.max_batch_messages
                        and now >= next_finish_check):  # fmt: skip
                    self._wait_for_batch()
                    if self._main_retries(finish_line.reached, "checking the finish line"):
                        self._finish_read_models()
                        break
                    next_finish_check = time.monotonic() + FINISH_CHECK_S
                    if next_finish_check >= next_waiting_report:
                        log.info("not finished yet: waiting for %s", finish_line.waiting_for)
                        next_waiting_report = next_finish_check + WAITING_REPORT_S
        finally:
            try:
                self._wait_for_batch()
            finally:
                self._apply_thread.shutdown(wait=True)
                self.producer.flush(10)
                self.consumer.close()
                self.replica_rebuilds.close()
        log.info(
            "stopped: %d events applied (%d by the fast path), %d dead letters",
            self.applied_events, self.fast_events, self.dead_letters,
        )  # fmt: skip
        return 0

    def _consume(self, timeout_s: float) -> int:
        """Poll the consumer (which also keeps this member in the group and runs rebalance
        callbacks), buffer what came; how many messages came."""
        messages = self.consumer.consume(self.config.max_batch_messages, timeout_s)
        self._last_poll = time.monotonic()
        fresh = 0
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    continue
                if error.code() == KafkaError._MAX_POLL_EXCEEDED:
                    # The group dropped us (on_lost follows); we rejoin with this poll. Our
                    # batches of the lost partitions fail at the fence.
                    log.warning("missed the group's poll deadline: %s", error.str())
                    continue
                raise KafkaException(error)
            key = (msg.topic(), msg.partition())
            if key not in self.next_offset:
                continue  # revoked since it was fetched: the next owner reads it
            fresh += 1
            self.partitions[key].buffer.append(msg)
        return fresh

    def _flush(self, drain: bool) -> None:
        """Cut every batch that is ready and hand it to the apply thread, one at a time and in
        order: while ClickHouse applies one batch (chDB releases the GIL), this thread consumes
        and prepares the next.

        Replay first: while an open intent waits for its replay, no other batch is applied (the
        read models' deltas of a half-applied batch are exact only against the state it saw:
        projector/read_models/maintenance.py)."""
        replaying = [key for key, state in self.partitions.items() if state.replay is not None]
        for (topic, partition), state in list(self.partitions.items()):
            if replaying and (topic, partition) not in replaying:
                continue
            if (topic, partition) in self._paused:
                continue  # what it fetched before the pause waits in its buffer
            # More than a poll takes (max_batch_messages) for the transaction topic, when set:
            # its buffer then fills over several polls, or is cut when one finds nothing newer.
            limit = self.config.batch_messages(topic)
            while state.buffer:
                batch_msgs, state.buffer = cut_batch(  # type: ignore[assignment]
                    state.buffer, offset_of, state.replay, limit, drain
                )
                if not batch_msgs:
                    break
                counted = False
                if state.counted and state.replay is None:
                    # R2: a batch lies wholly inside or wholly outside what the ledger counted
                    counted, until = counted_run(state.counted, offset_of(batch_msgs[0]))
                    if until is not None and offset_of(batch_msgs[-1]) >= until:
                        size = sum(1 for m in batch_msgs if offset_of(m) < until)
                        state.buffer = [*batch_msgs[size:], *state.buffer]
                        batch_msgs = batch_msgs[:size]
                elif state.counted and state.replay is not None:  # cut so when first cut
                    counted = counted_run(state.counted, state.replay.first)[0]
                batch = BatchRange(
                    topic, partition, offset_of(batch_msgs[0]), offset_of(batch_msgs[-1])
                )
                expected = self.next_offset.get((topic, partition), 0)
                if batch.first < expected and state.replay is None:
                    # Kafka went back (offsets out of range, reset to the earliest): the topic
                    # was re-created under us. Position it afresh (and so detect that).
                    log.warning("%s[%d] went back from offset %d to %d; positioning it afresh",
                                topic, partition, expected, batch.first)  # fmt: skip
                    self._wait_for_batch()
                    self._reposition(topic, partition)
                    break
                messages = KafkaMessages(batch_msgs)
                segments = self.applier.plan(messages)  # while the batch in flight applies
                positioned = state.positioned
                self._wait_for_batch()  # at most one batch in flight
                if self.partitions.get((topic, partition)) is not state or (
                    state.positioned != positioned
                ):
                    break  # revoked or re-positioned meanwhile: this batch is not ours to apply
                self._in_flight = self._apply_thread.submit(
                    self._commit_with_retries, batch, messages, segments, counted
                )
                state.replay = None
                if self.stopping:
                    return

    def _wait_for_batch(self) -> None:
        """Wait for the batch in flight (re-raising its failure), then tell Kafka. While it
        waits (ClickHouse may be down for minutes), the member keeps polling with every partition
        paused: it stays in the group and follows rebalances instead of being thrown out after
        max.poll.interval.ms with a batch still to write."""
        # Waiting a tenth of the poll interval after the last poll (an ordinary batch is done
        # by then, and pausing drops what librdkafka fetched ahead), it polls, paused.
        patience_s = self.config.max_poll_interval_ms / 1000 / 10
        if self._in_flight is not None:
            wait(
                [self._in_flight], timeout=max(0.0, self._last_poll + patience_s - time.monotonic())
            )
        try:
            while (
                self._in_flight is not None
                and not wait([self._in_flight], timeout=KEEP_POLLING_S).done
            ):
                self._poll_paused()
        finally:
            self._resume_paused()
        self._settle_batch()

    def _poll_paused(self) -> None:
        """Poll Kafka with every partition paused: the member stays in the group and follows
        rebalances while the main thread waits for ClickHouse (may run rebalance callbacks)."""
        if not self._waiting:
            self._waiting = True
            self.consumer.pause(self.consumer.assignment())
        self._consume(0)

    def _resume_paused(self) -> None:
        if self._waiting:
            self._waiting = False
            waiting = self._unpositioned | self._paused
            self.consumer.resume(
                [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in waiting]
            )

    def _honour_pauses(self) -> None:
        """Pause or resume the partitions of the tables `projector pause | resume` named (read
        every PAUSE_CHECK_S), after settling the batch in flight: a table stops after a whole
        batch, and its read models' watermarks hold where its transactions stop. A partition
        with an open intent is replayed first (replay first), then paused."""
        now = time.monotonic()
        if now < self._next_pause_check:
            return
        self._next_pause_check = now + PAUSE_CHECK_S
        try:
            self._pause_wanted = wanted = self.pauses.wanted()
        except TRANSIENT:
            return  # read on a later round
        pause = [
            key for key, state in self.partitions.items()
            if key in self.next_offset and key not in self._paused and state.replay is None
            and table_of(key[0]) in wanted
        ]  # fmt: skip
        resume = [key for key in self._paused if table_of(key[0]) not in wanted]
        if pause or resume:
            self._wait_for_batch()
            self.consumer.pause([TopicPartition(t, p) for t, p in pause])
            self._paused.update(pause)
            for topic, partition in resume:
                # Steps A-C again: while paused, its checkpoint may have moved (`projector
                # reset`, checkpoint.py R1-R3); our claim then lost, and this one is newer.
                self._reposition(topic, partition)
            self._paused.difference_update(resume)
            self.consumer.resume([TopicPartition(t, p) for t, p in resume
                                  if (t, p) in self.next_offset])  # fmt: skip
        # Recorded here, also for partitions paused on assignment (no ClickHouse in a rebalance).
        now_paused = {table_of(t) for t, _ in self._paused}
        changed = {
            t: t in now_paused
            for t in now_paused | set(self._recorded_pauses)
            if self._recorded_pauses.get(t) != (t in now_paused)
            and (t in now_paused or t not in wanted)
        }  # fmt: skip (revoked: not ours)
        for table, paused in sorted(changed.items()):
            log.info("%s %s (projector %s)", "paused" if paused else "resumed", table,
                     "pause" if paused else "resume")  # fmt: skip
            self._main_retries(partial(self.pauses.record, table, paused), "recording a pause")
            self._recorded_pauses[table] = paused
            self.metrics.table_paused.labels(table).set(int(paused))

    def _sleep_polling(self, seconds: float) -> None:
        """The main thread's back-off: it keeps polling while it sleeps."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._poll_paused()
            time.sleep(min(left, KEEP_POLLING_S))

    def _main_retries(self, action: Callable[[], T], what: str) -> T:
        """`with_retries` on the main thread: never so long that Kafka drops the member."""
        try:
            return with_retries(action, what, sleep=self._sleep_polling)
        finally:
            self._resume_paused()

    def _reposition(self, topic: str, partition: int) -> None:
        """Steps A-C again for one partition we hold (its batch was refused, or Kafka went
        back), then continue it from there."""
        (resume,) = self._main_retries(lambda: self._position([(topic, partition)]),
                                       "reading checkpoints")  # fmt: skip
        held = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        if (topic, partition) not in held:  # revoked while we retried: not ours to continue
            self._forget([TopicPartition(topic, partition)])
            return
        self.consumer.seek(TopicPartition(topic, partition, resume.offset))

    def _settle_batch(self, wait_s: float | None = None, reclaim: bool = True) -> None:
        """Take the batch in flight's outcome (waiting up to `wait_s`; None: until it is done).
        A batch the fence refused is dropped: if Kafka still gives us its partition (and we may
        `reclaim`: not inside a revoke), we claim it anew and resume from its checkpoint (steps
        A-C); if not, its new owner applies it."""
        if self._in_flight is None:
            return
        if wait_s is not None and not wait([self._in_flight], timeout=wait_s).done:
            log.warning("handing over while a batch is still in flight (ClickHouse unavailable?); "
                        "the fence keeps it out if it finishes later")  # fmt: skip
            return
        future, self._in_flight = self._in_flight, None
        try:
            batch = future.result()
        except PartitionLost as lost:
            key = (lost.topic, lost.partition)
            log.warning("dropped a batch of %s[%d]: %s", lost.topic, lost.partition, lost)
            if reclaim and key in self.next_offset:  # Kafka still says ours: claim it again
                self._reposition(lost.topic, lost.partition)
            return
        key = (batch.topic, batch.partition)
        if key in self.next_offset:
            self.next_offset[key] = batch.last + 1
            acknowledge(self.consumer, batch)

    def _report_lag(self) -> None:
        """Lag per assigned partition into the metrics."""
        for (topic, partition), next_offset in list(self.next_offset.items()):
            try:
                _, end = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except KafkaException:
                continue
            state = self.partitions.get((topic, partition))
            waiting = state.buffer[0].timestamp()[1] if state and state.buffer else None
            self.metrics.set_lag(topic, partition, end, next_offset, waiting)

    def _report_watermarks(self) -> None:
        """Each read model's watermark into the metrics; one that fails does not keep the
        others from being reported (the first failure is raised once they are done)."""
        failure: Exception | None = None
        for model in self.read_model_list:
            collections = [f"{self.config.read_model_schema}.{s}" for s in model.sources]
            try:
                mark = self.ledger.watermark(collections, self._watermarks.get(model.name))
            except Exception as exc:  # reported by the chore once the others are done
                failure = failure or exc
                continue
            if mark is not None:
                self._watermarks[model.name] = mark
                self.metrics.watermark_lsn.labels(model.name).set(mark.lsn)
        if failure is not None:
            raise failure

    def _prune_ledger(self) -> None:
        pruned = self.ledger.prune()
        if pruned:
            log.info("transaction ledger: %d settled transaction(s) pruned", pruned)

    def _ensure_read_models(self) -> None:
        """Start read-model families whose sources now exist (checked every few seconds), and
        build new versions a chunk at a time. Both run with no batch in flight, so they are
        serialized with the batches' maintenance."""
        if self.read_models is None or time.monotonic() < self._next_read_model_check:
            return
        if any(state.replay is not None for state in self.partitions.values()):
            return  # replay first
        self._wait_for_batch()
        maintainer = self.read_models
        for line in self._main_retries(maintainer.ensure, "starting read models"):
            log.info("read models: %s", line)
        taken = self._main_retries(partial(take_requests, self.requests, maintainer),
                                   "taking rebuild requests")  # fmt: skip
        for line in taken:
            log.info("read models: %s", line)
        if maintainer.building:
            progress = self._main_retries(maintainer.backfill_step, "backfilling read models")
            if progress is not None:
                log.info("read models: %s", progress)
            return  # the next chunk on the next round, between batches
        self._next_read_model_check = time.monotonic() + 3

    def _rebuild_replicas(self) -> None:
        """Take replica-table rebuild requests (once a second) and move every rebuild job whose
        topic this member holds whole a step, with no batch in flight (replay first: not while
        an open intent waits). projector/operations/replica_rebuild.py says why that is exact."""
        if any(state.replay is not None for state in self.partitions.values()):
            return
        now = time.monotonic()
        if now >= self._next_replica_request_check:
            self._next_replica_request_check = now + 1
            rebuilds = self.replica_rebuilds
            pending = [r for r in self._main_retries(self.requests.pending, "reading requests")
                       if "." in r.target]  # fmt: skip
            if pending:
                self._wait_for_batch()
                lines = self._main_retries(
                    partial(take_replica_requests, self.requests, rebuilds, self.applied_to),
                    "taking replica rebuild requests",
                )
                for line in lines:
                    log.info("replica rebuild: %s", line)
            self._replica_jobs = self._main_retries(rebuilds.jobs, "reading replica rebuilds")
        held: dict[str, int] = defaultdict(int)
        for topic, _ in self.next_offset:
            held[topic] += 1
        jobs = [
            j for j in self._replica_jobs
            if held.get(j.topic) and held[j.topic] == len(self.replica_rebuilds.partitions(j.topic))
        ]  # fmt: skip
        if not jobs:
            return
        self._wait_for_batch()
        for job in jobs:
            try:
                caught_up = self._main_retries(
                    partial(self.replica_rebuilds.step, job, self.applied_to),
                    "rebuilding a replica",
                )
            except RebuildRefused as exc:  # the job fails, never the pipeline
                log.error("replica rebuild of %s failed: %s", job.table, exc)
                self._main_retries(partial(self.replica_rebuilds.fail, job, str(exc)),
                                   "recording a failed rebuild")  # fmt: skip
                self.replica_rebuilds.forget(job)
                continue
            swapped = self._main_retries(
                partial(self.replica_rebuilds.finish_step, job, caught_up), "swapping a replica"
            )
            if swapped is not None:
                log.info("replica rebuild: %s", swapped)

    def _finish_read_models(self) -> None:
        """At the finish line: every read model whose sources exist is started and built."""
        while True:
            self._next_read_model_check = 0.0
            self._ensure_read_models()
            if self.read_models is None or not self.read_models.building:
                return

    def _commit_with_retries(
        self, batch: BatchRange, messages: KafkaMessages, segments: list[Segment] | None,
        counted: bool = False,
    ) -> BatchRange:  # fmt: skip
        def attempt() -> None:
            self.committer.commit(batch, lambda rng: self._apply(rng, messages, segments, counted))

        with_retries(
            attempt,
            f"applying {batch.topic}[{batch.partition}] {batch.first}-{batch.last}",
            stop=lambda: self.stopping,
        )
        return batch

    def _apply(
        self, batch: BatchRange, messages: KafkaMessages, segments: list[Segment] | None,
        counted: bool = False,
    ) -> None:  # fmt: skip
        """Apply one batch: its replica rows, the read models it feeds, its ledger progress
        (none when `counted`: re-read after a reset, its events were counted when first
        applied)."""
        if batch.topic == self.config.transaction_topic:
            self.ledger.record_ends(batch, self._transaction_events(batch, messages))
            return
        stopped = self.guard.stopped_reason(batch.topic, _key_schema_ids(messages))
        if stopped is not None:
            self._refuse(batch, messages, stopped)
            return
        started = time.monotonic()
        outcome = self.applier.apply(batch, messages, self._dead_letter, segments, planned=True)
        if self.read_models is not None:
            kept = time.monotonic()
            schema, table = source_table_of(batch.topic)
            self.read_models.apply_batch(batch, schema, table)
            self.metrics.read_model_seconds.labels(table).observe(time.monotonic() - kept)
        if counted:
            self.metrics.events_reread.labels(table_of(batch.topic)).inc(
                outcome.applied
            )
        else:
            self.ledger.record_progress(batch, outcome.transactions, outcome.dead_transactions)
        self.applied_events += outcome.applied
        self.fast_events += outcome.applied if outcome.fast else 0
        path = "fast" if outcome.fast else "per_message"
        self.metrics.batch_seconds.labels(path).observe(time.monotonic() - started)
        table = table_of(batch.topic)
        self.metrics.events_applied.labels(table, path).inc(outcome.applied)
        if outcome.dead:
            self.metrics.dead_letters.labels(batch.topic).inc(len(outcome.dead))
        self.dead_letters += len(outcome.dead)

    def _refuse(self, batch: BatchRange, messages: KafkaMessages, reason: str) -> None:
        """A stopped table's batch: every message into the DLQ with the reason (a tombstone
        carries nothing), each settled for its transaction."""
        letters, dead = [], BatchOutcome(0, [])
        collection = table_of(batch.topic)
        for message in messages:
            if message.value is None:
                continue
            letters.append(DeadLetter.of(message, PoisonMessage("topic", reason)))
            try:
                event = decode(message, self.schemas)
            except PoisonMessage:
                continue
            place = None if event is None else EventPlace.of(event.value)
            if place:
                dead.count_dead_letter(place, collection)
        if letters:
            log.warning("%d dead letters %s[%d]@%d-%d (topic): %s", len(letters), batch.topic,
                        batch.partition, batch.first, batch.last, reason)  # fmt: skip
            self._dead_letter(batch, letters, log_each=False)
            self.metrics.dead_letters.labels(batch.topic).inc(len(letters))
            self.dead_letters += len(letters)
        self.ledger.record_progress(batch, {}, dead.dead_transactions)

    def _describe_topic(self, topic: str) -> TopicShape | None:
        """Kafka's id and partition count of `topic` now (None: Kafka cannot say right now)."""
        try:
            futures = self.admin.describe_topics(TopicCollection([topic]), request_timeout=10)
            description = futures[topic].result(timeout=15)
        except KafkaException as exc:
            log.warning("cannot describe topic %s: %s", topic, exc)
            return None
        return TopicShape(str(description.topic_id), len(description.partitions))

    def _partition_count(self, topic: str) -> int | None:
        """The topic's partition count as recorded at its first batch (a changed count stops
        the table before any batch applies), else as Kafka describes it now."""
        recorded = self.guard.recorded(topic)
        if recorded is not None:
            return recorded.partitions
        shape = self.guard.shape(topic)
        return None if shape is None else shape.partitions

    def _transaction_events(
        self, batch: BatchRange, messages: Sequence[RawMessage]
    ) -> list[tuple[int, dict[str, Any] | None]]:
        """The decoded events of a transaction-topic batch; None for one that cannot be decoded
        (it may be an END: the ledger holds every watermark there, and it is dead-lettered so
        that `projector dlq replay` can record it once it reads)."""
        events: list[tuple[int, dict[str, Any] | None]] = []
        letters = []
        for message in messages:
            if message.value is None:
                continue
            try:
                events.append((message.offset, self.schemas.decode(message.value)[1]))
            except (SchemaError, UnknownSchema, NotConfluentFramed, ValueError, EOFError,
                    TypeError, IndexError) as exc:  # fmt: skip
                log.error("unreadable event at offset %d of the transaction topic: read models' "
                          "watermarks stop there until it is replayed: %s", message.offset, exc)  # fmt: skip
                events.append((message.offset, None))
                reason = f"undecodable transaction event: {type(exc).__name__}: {exc}"
                letters.append(DeadLetter.of(message, PoisonMessage("decode", reason)))
        if letters:
            self._dead_letter(batch, letters)
        return events

    def _dead_letter(
        self, batch: BatchRange, letters: list[DeadLetter], log_each: bool = True
    ) -> None:
        self.dlq.add(batch, letters)
        for letter in letters:
            if log_each:
                log.warning("dead letter %s[%d]@%d (%s): %s", letter.topic, letter.partition,
                            letter.offset, letter.stage, letter.error)  # fmt: skip
            self.producer.produce(
                self.config.dlq_topic, key=letter.key, value=letter.value,
                headers={"origin.topic": letter.topic, "origin.partition": str(letter.partition),
                         "origin.offset": str(letter.offset), "stage": letter.stage,
                         "error": letter.error[:1000]},
            )  # fmt: skip
        self.producer.poll(0)

    def applied_to(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        """Per partition, the next offset to apply: everything before it is applied. Ours from
        this process (call with no batch in flight), the others' from their checkpoints, read
        afresh (the checkpoint table, not the group's offsets, is the truth: step B)."""
        applied: dict[tuple[str, int], int | None] = {}
        theirs = []
        for topic, partition in partitions:
            next_offset = self.next_offset.get((topic, partition))
            if next_offset is None:
                theirs.append((topic, partition))
                continue
            state = self.partitions.get((topic, partition))
            if state is None or not state.buffer:
                # Nothing consumed waits to be applied: the consumer's position is past what
                # Kafka skipped (gaps at the end: transaction markers, compaction) too.
                (position,) = self.consumer.position([TopicPartition(topic, partition)])
                next_offset = max(next_offset, position.offset)
            applied[(topic, partition)] = next_offset
        checkpoints = self.checkpoints.load(theirs) if theirs else {}
        for key in theirs:
            checkpoint = checkpoints.get(key)
            applied[key] = None if checkpoint is None else checkpoint.resume_offset
        return applied



def _key_schema_ids(messages: KafkaMessages) -> set[int]:
    """The registry ids of the batch's Confluent-framed keys."""
    _, keys, _ = messages.columns()
    return {int.from_bytes(k[1:5], "big") for k in keys if k and len(k) >= 5 and k[0] == 0}


class _RunProgress:
    """The finish line's view of a running projector (projector/commit/finish_line.py, `Progress`)."""

    def __init__(self, projector: Projector) -> None:
        self.projector = projector

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """End offsets of every subscribed partition, from fresh metadata (a topic created a
        moment ago counts)."""
        consumer, config = self.projector.consumer, self.projector.config
        ends = {}
        for topic, topic_metadata in consumer.list_topics(timeout=10).topics.items():
            if not config.subscribes_to(topic):
                continue
            for partition in topic_metadata.partitions:
                tp = TopicPartition(topic, partition)
                _, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                if high > 0:
                    ends[(topic, partition)] = high
        return ends

    def applied_to(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        return self.projector.applied_to(partitions)

    def fence_offset(self, lsn: int) -> int | None:
        return self.projector.ledger.fence_offset(lsn)

    def unfinished(self, fence_offset: int) -> Unfinished | None:
        config = self.projector.config
        return self.projector.ledger.unfinished(
            fence_offset, config.topic_pattern(), config.topic_prefix
        )
