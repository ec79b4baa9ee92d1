"""The consume → batch → apply loop behind `projector run`.

One consumer-group member: it consumes, buffers per partition, cuts batches and plans each on this
thread, and hands them to the apply thread, which applies them one after the other in the order
they were cut, reading ahead during a backlog (the rules: projector/run/in_flight.py). Where partitions
resume, how batches are cut and replayed, and how a batch is committed are the commit protocol's
(projector/commit/checkpoint.py, steps A-C and 1-5); this loop calls it in that order.

Transient failures (ClickHouse, registry) are retried with exponential back-off and jitter,
logged once when they start and once when they clear; the batch is then applied as if nothing
happened. SIGTERM/SIGINT: the batch in progress finishes, then the loop exits 0.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from projector import kafka
from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import (
    RESET,
    BatchRange,
    Resume,
    acknowledge,
    counted_ranges,
    counted_run,
    cut_batch,
)
from projector.commit.finish_line import Finish, FinishLine
from projector.config import ProjectorConfig
from projector.errors import PartitionLost
from projector.messages import KafkaMessages
from projector.metrics import ProjectorMetrics
from projector.run.batch import BatchWork
from projector.run.duties import Chore, Duties, Duty
from projector.run.in_flight import (
    PARTIAL_BATCH_WAIT_S,
    READ_AHEAD_BATCHES,
    BatchesInFlight,
    NotApplied,
    after,
    consume_slices,
)
from projector.run.partitions import PartitionState, offset_of
from projector.run.parts import open_parts
from projector.run.pausing import TablePausing
from projector.run.progress import RunProgress
from projector.run.reports import chores
from projector.run.retries import TRANSIENT, with_retries
from projector.run.upkeep import ReplicaRebuildJobs, StageRunner, holds_whole
from projector.run.visibility import VisibilityReport

log = logging.getLogger("projector")
T = TypeVar("T")
KEEP_POLLING_S = 1.0  # how often a member waiting long for its batch polls (stays in the group)
SOURCE_REPLICAS_CHECK_S = 30.0  # how often it looks for captured tables without a replica
FINISH_CHECK_S = 0.5  # how often a run asked to finish looks at its finish line, at most
FIRST_WAITING_REPORT_S, WAITING_REPORT_S = 5.0, 30.0  # when it logs what it still waits for


class Projector:
    def __init__(self, config: ProjectorConfig, ch: ClickHouse) -> None:
        # A SIGTERM while starting (tables created, claims, Kafka clients) stops the run before
        # its first batch, cleanly, like one later.
        self.stopping = False
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.config = config
        self.parts = parts = open_parts(config, ch, kafka.admin(config.kafka_bootstrap))
        self.checkpoints, self.committer, self.ledger = (
            parts.checkpoints,
            parts.committer,
            parts.ledger,
        )
        self.partitions: dict[tuple[str, int], PartitionState] = defaultdict(PartitionState)
        # The next offset to apply per assigned partition (after the last batch done).
        self.next_offset: dict[tuple[str, int], int] = {}
        self._apply_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self._in_flight = BatchesInFlight()  # handed to the apply thread, oldest first
        self._lost: set[tuple[str, int]] = set()  # a batch was refused: claim again when settled
        self._waiting = False  # partitions paused while the main thread waits for ClickHouse
        self._unpositioned: set[tuple[str, int]] = set()  # assigned, paused: steps A-C failed
        self._last_poll = time.monotonic()
        self.metrics = ProjectorMetrics()
        if config.metrics_port:
            self.metrics.serve_or_warn(config.metrics_port, config.metrics_host)
        self.consumer = kafka.group_member(
            config.kafka_bootstrap,
            config.group_id,
            config.session_timeout_ms,
            config.max_poll_interval_ms,
        )
        self.producer = kafka.producer(config.kafka_bootstrap, linger_ms=50)
        self.progress = RunProgress(
            config,
            self.consumer,
            self.next_offset,
            self.partitions,
            parts.checkpoints,
            parts.ledger,
        )
        self.batches = BatchWork(
            config,
            parts.committer,
            parts.applier,
            parts.ledger,
            parts.guard,
            parts.dlq,
            self.producer,
            parts.schemas,
            self.metrics,
            lambda: self.stopping,
            self._after_commit,
        )
        self.visibility = VisibilityReport(
            parts.ch, parts.applier.catalog, self.metrics, config, parts.read_model_list
        )
        # The read models follow the committed replicas on a thread of their own.
        observe = lambda table, s: self.metrics.read_model_seconds.labels(table).observe(s)  # noqa: E731
        self.read_models = StageRunner(parts.stage, parts.requests, observe)
        self.duties = self._duties()

    def _duties(self) -> Duties:
        """What this member does between batches, in this order (projector/run/duties.py)."""
        parts = self.parts
        wanted = with_retries(parts.pauses.wanted, "reading paused tables")
        self.pausing = TablePausing(
            parts.pauses,
            self.consumer,
            self.partitions,
            self.next_offset,
            self.release,
            self.main_retries,
            self.metrics,
            wanted,
        )
        duties: list[Duty] = [self.pausing]
        duties += chores(
            self.config, self.metrics, self.consumer, self.next_offset, self.partitions,
            parts.ledger, parts.read_model_list,
        )  # fmt: skip

        def create_source_replicas() -> None:
            for line in parts.source_replicas.create_missing():
                log.info(line)

        # A read-model family starts once each of its sources has a replica.
        self.source_replicas = Chore(
            "creating replicas of captured tables",
            create_source_replicas,
            every_s=SOURCE_REPLICAS_CHECK_S,
            failed=lambda name: self.metrics.chore_failures.labels(name).inc(),
        )
        duties.append(self.source_replicas)
        rebuilds = parts.replica_rebuilds
        may_step = holds_whole(rebuilds, lambda: list(self.next_offset))
        duties.append(
            ReplicaRebuildJobs(
                rebuilds, parts.requests, self.progress.applied_to, may_step, self.main_retries
            )
        )

        def replay_pending() -> bool:
            return any(state.replay is not None for state in self.partitions.values())

        return Duties(duties, settle=self._wait_for_batch, replay_pending=replay_pending)

    # ---- assignment --------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            resumes = self._position(keys)
        except TRANSIENT as exc:
            # Never wait for ClickHouse inside a rebalance: the whole group would wait for us.
            # The partitions wait, paused, until the main loop can position them.
            log.warning(
                "cannot position %d assigned partition(s) yet, they wait: %s", len(keys), exc
            )
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)
            self._unpositioned.update(keys)
            return
        consumer.incremental_assign(
            [TopicPartition(r.topic, r.partition, r.offset) for r in resumes]
        )
        # A paused table's partitions stay paused (an open intent is replayed first, then they
        # pause: nothing else is applied before it).
        paused = self.pausing.pause_on_assign(
            [(r.topic, r.partition) for r in resumes if r.replay is None]
        )
        if paused:
            consumer.pause([TopicPartition(topic, partition) for topic, partition in paused])
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
        recreated = {topic for topic in topics if self.parts.guard.recreated(topic)}
        for index, resume in enumerate(resumes):
            if resume.topic in recreated:
                log.error(
                    "%s was re-created: its table stops (see `projector dlq list`)", resume.topic
                )
                self.committer.forget_checkpoint(resume.topic, resume.partition)
                resume = resumes[index] = Resume(resume.topic, resume.partition, 0, None)
            state = self.partitions[(resume.topic, resume.partition)]
            state.buffer.clear()
            state.replay = resume.replay
            state.positioned += 1
            state.counted = counted_ranges(history.get((resume.topic, resume.partition), []))
            checkpoint = self.committer.checkpoints.get((resume.topic, resume.partition))
            if checkpoint is not None and checkpoint.state == RESET:
                log.info(
                    "%s[%d]: `projector reset` moved it to offset %d; reading from there "
                    "(offsets counted before: %s)",
                    resume.topic,
                    resume.partition,
                    resume.offset,
                    state.counted or "none",
                )
            self.next_offset[(resume.topic, resume.partition)] = resume.offset
            log.info(
                "assigned %s[%d] from offset %d", resume.topic, resume.partition, resume.offset
            )
            if resume.replay is not None:
                log.info(
                    "replaying the open intent %d-%d of %s[%d] (the last run stopped inside it)",
                    resume.replay.first,
                    resume.replay.last,
                    resume.topic,
                    resume.partition,
                )
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
        log.warning(
            "lost %s to the group (no poll or heartbeat in time)",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions),
        )
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._unpositioned.discard((tp.topic, tp.partition))
            self._lost.discard((tp.topic, tp.partition))
            self.pausing.forget((tp.topic, tp.partition))
            self.metrics.forget(tp.topic, tp.partition)
            self.next_offset.pop((tp.topic, tp.partition), None)
            self.partitions.pop((tp.topic, tp.partition), None)
        self.committer.release([(tp.topic, tp.partition) for tp in partitions])

    def _after_commit(self, batch: BatchRange) -> None:
        self.visibility.after_commit(batch)
        self.read_models.poke()  # its range is the stage's to recompute now

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
        finish_line = None if finish is None else FinishLine(finish, self.progress)
        if finish is not None:
            log.info("running until %s is applied", finish.describe())
        self.source_replicas.run()  # a read model over a table still empty exists from the start
        self.read_models.start()
        self.consumer.subscribe(
            self.config.subscription(),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        next_finish_check = time.monotonic()
        next_waiting_report = next_finish_check + FIRST_WAITING_REPORT_S
        try:
            while not self.stopping:
                # A partial batch waits for the one applying: look again soon.
                wait_s = self.config.max_batch_wait_ms / 1000
                if self._in_flight.applying() and any(s.buffer for s in self.partitions.values()):
                    wait_s = min(wait_s, PARTIAL_BATCH_WAIT_S)
                fresh = self._consume(wait_s)
                self._flush(drain=fresh < self.config.max_batch_messages)
                if self._lost or self._in_flight.oldest_done():
                    self._settle_batch()  # an idle loop still records the last batch
                self._position_waiting()
                self.duties.run_due()
                if self.read_models.failure is not None:
                    raise self.read_models.failure
                if tick is not None:
                    tick()
                now = time.monotonic()
                if stop_at is not None and now >= stop_at:
                    break
                # Checked when the poll found the buffers drained (no full backlog waiting) and
                # at most every FINISH_CHECK_S; with no batch in flight, positions are settled.
                if (
                    finish_line is not None
                    and fresh < self.config.max_batch_messages
                    and now >= next_finish_check
                ):
                    self._wait_for_batch()
                    if self.main_retries(finish_line.reached, "checking the finish line"):
                        self.read_models.finish(lambda: self.stopping)
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
                self.read_models.stop()
                self.producer.flush(10)
                self.consumer.close()
                self.parts.replica_rebuilds.close()
        log.info(
            "stopped: %d events applied (%d by the fast path), %d dead letters",
            self.batches.applied_events,
            self.batches.fast_events,
            self.batches.dead_letters,
        )
        return 0

    def _consume(self, timeout_s: float) -> int:
        """Poll the consumer (which also keeps this member in the group and runs rebalance
        callbacks), buffer what came; how many messages came."""
        fresh = 0
        for messages in consume_slices(self.consumer, self.config.max_batch_messages, timeout_s):
            self._last_poll = time.monotonic()
            for msg in messages:
                error = msg.error()
                if error is not None:
                    if error.code() in (
                        KafkaError._PARTITION_EOF,
                        KafkaError.UNKNOWN_TOPIC_OR_PART,
                    ):
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
        """Cut every batch that is ready and hand it to the apply thread, in order, by the
        read-ahead's rules (projector/run/in_flight.py: a partial batch waits until none applies).

        Replay first: while an open intent waits for its replay, no other batch is applied (the
        read models' deltas of a half-applied batch are exact only against the state it saw:
        projector/read_models/maintenance.py)."""
        replaying = [key for key, state in self.partitions.items() if state.replay is not None]
        idle = not self._in_flight.applying()  # for every partition alike: none starves
        for (topic, partition), state in list(self.partitions.items()):
            if replaying and (topic, partition) not in replaying:
                continue
            if (topic, partition) in self.pausing.paused:
                continue  # what it fetched before the pause waits in its buffer
            if (topic, partition) in self._lost:
                continue  # claimed again and re-positioned once the batches in flight are in
            # More than a poll takes (max_batch_messages) for the transaction topic, when set:
            # its buffer then fills over several polls, or is cut when one finds nothing newer.
            limit = self.config.batch_messages(topic)
            while state.buffer:
                batch_msgs, state.buffer = cut_batch(  # type: ignore[assignment]
                    state.buffer,
                    offset_of,
                    state.replay,
                    limit,
                    drain and idle,
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
                    log.warning(
                        "%s[%d] went back from offset %d to %d; positioning it afresh",
                        topic,
                        partition,
                        expected,
                        batch.first,
                    )
                    self._wait_for_batch()
                    self._reposition(topic, partition)
                    break
                messages = KafkaMessages(batch_msgs)
                # Made while the batch in flight applies: its plan, and the columns and key
                # schema ids every later step reads (kept by `messages`).
                segments = self.parts.applier.plan(messages)
                messages.key_schema_ids()
                positioned = state.positioned
                self._wait_for_batch(keep=READ_AHEAD_BATCHES - 1)  # room for this one
                if (
                    self.partitions.get((topic, partition)) is not state
                    or state.positioned != positioned
                    or (topic, partition) in self._lost
                ):
                    break  # revoked or re-positioned meanwhile: this batch is not ours to apply
                claim = self.committer.claims.get((topic, partition))
                commit = partial(self.batches.commit, batch, messages, segments, counted, claim)
                previous = self._in_flight.newest()
                self._in_flight.add(self._apply_thread.submit(after, previous, commit))
                state.replay = None
                if self.stopping:
                    return

    def _wait_for_batch(self, keep: int = 0) -> None:
        """Wait until at most `keep` batches are in flight (re-raising a failure), then take the
        outcomes of those done and tell Kafka. While it waits (ClickHouse may be down for
        minutes), the member keeps polling with every partition paused: it stays in the group
        and follows rebalances instead of being thrown out after max.poll.interval.ms with a
        batch still to write."""
        # Waiting a tenth of the poll interval after the last poll (an ordinary batch is done
        # by then, and pausing drops what librdkafka fetched ahead), it polls, paused.
        patience_s = self.config.max_poll_interval_ms / 1000 / 10

        if self._in_flight.beyond(keep):
            wait(
                self._in_flight.beyond(keep),
                timeout=max(0.0, self._last_poll + patience_s - time.monotonic()),
            )
        try:
            while (awaited := self._in_flight.beyond(keep)) and wait(
                awaited, timeout=KEEP_POLLING_S
            ).not_done:
                self._poll_paused()  # (a rebalance callback may settle batches meanwhile)
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
            waiting = self._unpositioned | self.pausing.paused
            self.consumer.resume(
                [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in waiting]
            )

    def main_retries(self, action: Callable[[], T], what: str) -> T:
        """`with_retries` on the main thread: never so long that Kafka drops the member (its
        back-off keeps polling while it sleeps)."""

        def sleep_polling(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                self._poll_paused()
                time.sleep(min(left, KEEP_POLLING_S))

        try:
            return with_retries(action, what, sleep=sleep_polling)
        finally:
            self._resume_paused()

    def _reposition(self, topic: str, partition: int) -> None:
        """Steps A-C again for one partition we hold (its batch was refused, or Kafka went
        back), then continue it from there."""
        (resume,) = self.main_retries(
            lambda: self._position([(topic, partition)]), "reading checkpoints"
        )
        held = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        if (topic, partition) not in held:  # revoked while we retried: not ours to continue
            self._forget([TopicPartition(topic, partition)])
            return
        self.consumer.seek(TopicPartition(topic, partition, resume.offset))

    def _settle_batch(self, wait_s: float | None = None, reclaim: bool = True) -> None:
        """Take the outcomes of the batches in flight that are done, oldest first (with `wait_s`:
        first waiting up to that long for all of them). A batch the fence refused is dropped,
        and so are the batches of its partition behind it (cut under the same claim): once none
        is in flight, if Kafka still gives us the partition (and we may `reclaim`: not inside a
        revoke), we claim it anew and resume from its checkpoint (steps A-C); if not, its new
        owner applies them."""
        if wait_s is not None and wait(self._in_flight.beyond(0), timeout=wait_s).not_done:
            log.warning(
                "handing over while a batch is still in flight (ClickHouse unavailable?); "
                "the fence keeps it out if it finishes later"
            )
            return
        while self._in_flight.oldest_done():
            future = self._in_flight.take_oldest()
            try:
                batch = future.result()
            except PartitionLost as refused:
                key = (refused.topic, refused.partition)
                if key not in self._lost:
                    log.warning("dropped a batch of %s[%d]: %s", *key, refused)
                self._lost.add(key)
                continue
            except NotApplied:  # the failure before it is what ends the run
                continue
            key = (batch.topic, batch.partition)
            if key in self.next_offset and key not in self._lost:
                self.next_offset[key] = batch.last + 1
                acknowledge(self.consumer, batch)
        if self._lost and reclaim and not self._in_flight:
            lost, self._lost = sorted(self._lost), set()
            for topic, partition in lost:
                if (topic, partition) in self.next_offset:  # Kafka still says ours: claim again
                    self._reposition(topic, partition)

    # ---- what the duties ask of the loop (projector/run/pausing.py, upkeep.py) ------------------

    def release(self, keys: list[tuple[str, int]]) -> None:
        for topic, partition in keys:
            # Steps A-C again: while held, its checkpoint may have moved (`projector reset`,
            # checkpoint.py R1-R3); our claim then lost, and this one is newer.
            self._reposition(topic, partition)
        self.consumer.resume([TopicPartition(t, p) for t, p in keys if (t, p) in self.next_offset])
