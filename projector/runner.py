"""The consume → batch → apply loop behind `projector run`.

One consumer-group member: it consumes, buffers per partition, cuts batches, plans each on this
thread while the previous one applies on the apply thread, and reports metrics. Where partitions
resume, how batches are cut and replayed, and how a batch is committed are the commit protocol's
(projector/checkpoint.py, steps A-C and 1-5); this loop calls it in that order.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)  # fmt: skip

from projector.apply import BatchApplier
from projector.catch_up import Finish, FinishLine
from projector.checkpoint import (
    PROJECTION,
    BatchCommitter,
    BatchRange,
    CheckpointStore,
    acknowledge,
    cut_batch,
)
from projector.clickhouse import ClickHouse
from projector.config import ProjectorConfig
from projector.dlq import DeadLetter, DeadLetterStore
from projector.errors import ClickHouseUnavailable, PoisonMessage, SourceUnavailable
from projector.fast_path import FastPath, Segment
from projector.materialize import ReadModelMaintainer, maintainer_for
from projector.messages import KafkaMessages, RawMessage, source_table_of
from projector.metrics import ProjectorMetrics
from projector.replica import ReplicaCatalog
from projector.resnapshot import SignalTable
from projector.transactions import TransactionLedger, Unfinished, Watermark
from queries.read_models import load_read_models
from schemas.errors import NotConfluentFramed, RegistryUnavailable, SchemaError, UnknownSchema
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters

log = logging.getLogger("projector")
T = TypeVar("T")
TRANSIENT: tuple[type[Exception], ...] = (
    ClickHouseUnavailable, RegistryUnavailable, SourceUnavailable,
)  # fmt: skip
FINISH_CHECK_S = 0.5  # how often a run asked to finish looks at its finish line, at most
FIRST_WAITING_REPORT_S, WAITING_REPORT_S = 5.0, 30.0  # when it logs what it still waits for


def with_retries(
    action: Callable[[], T], what: str, stop: Callable[[], bool] = lambda: False,
    base_s: float = 0.2, cap_s: float = 30.0,
) -> T:  # fmt: skip
    """Run `action`, retrying transient failures with full-jitter exponential back-off."""
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
            time.sleep(random.uniform(0, min(cap_s, base_s * 2**attempt)))
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
    high_watermark: int = 0


class Projector:
    def __init__(self, config: ProjectorConfig, ch: ClickHouse) -> None:
        self.config = config
        self.ch = ch
        self.schemas = SchemaCache(config.registry_url)
        self.checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
        self.dlq = DeadLetterStore(ch, config.control_database, PROJECTION)
        with_retries(self.checkpoints.create, "creating the checkpoint table")
        with_retries(self.dlq.create, "creating the DLQ table")
        self.ledger = TransactionLedger(ch, config.control_database, PROJECTION)
        with_retries(self.ledger.create, "creating the transaction ledger")
        self.committer = BatchCommitter(self.checkpoints)
        fast_path = None
        if config.fast_path and hasattr(ch, "over_avro"):
            fast_path = FastPath(ch, config.registry_url, config.transaction_metadata)  # type: ignore[arg-type]
        self.applier = BatchApplier(
            ch, self.schemas,
            ReplicaCatalog(ch, config.replica_prefix, SignalTable(config.source_dsn).request),
            PROJECTION,
            upcasters=Upcasters.load(config.upcasters_file), fast_path=fast_path,
        )  # fmt: skip
        # Read models are kept inside the batch commit (projector/materialize.py); None when this
        # member does not keep them (config `maintain_read_models`).
        self.read_models: ReadModelMaintainer | None = maintainer_for(config, ch)
        self.read_model_list = load_read_models(config.read_models_file)
        self._next_read_model_check = 0.0
        self.partitions: dict[tuple[str, int], PartitionState] = defaultdict(PartitionState)
        # The next offset to apply per assigned partition (after the last batch done).
        self.next_offset: dict[tuple[str, int], int] = {}
        self._apply_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self._in_flight: Future[BatchRange] | None = None
        self.metrics = ProjectorMetrics()
        self._next_progress_report = self._next_watermark_report = 0.0
        # Each read model's watermark as last found: the next search starts there.
        self._watermarks: dict[str, Watermark] = {}
        self._next_prune = time.monotonic() + config.ledger_prune_interval_s
        if config.metrics_port:
            try:
                self.metrics.serve(config.metrics_port, config.metrics_host)
                log.info("metrics at http://127.0.0.1:%d/metrics", config.metrics_port)
            except OSError as exc:
                log.warning("no metrics endpoint: port %d: %s (set PROJECTOR_METRICS_PORT)",
                            config.metrics_port, exc)  # fmt: skip
        self.stopping = False
        self.applied_events = 0
        self.fast_events = 0  # of which applied by the fast path
        self.dead_letters = 0
        self.consumer = Consumer(
            {
                "bootstrap.servers": config.kafka_bootstrap,
                "group.id": config.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "topic.metadata.refresh.interval.ms": 2000,
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": config.session_timeout_ms,
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
            }
        )
        self.producer = Producer({"bootstrap.servers": config.kafka_bootstrap, "linger.ms": 50})

    # ---- assignment --------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        resumes = with_retries(lambda: self.committer.assign(keys), "reading checkpoints")
        for resume in resumes:
            state = self.partitions[(resume.topic, resume.partition)]
            state.buffer.clear()
            state.replay = resume.replay
            self.next_offset[(resume.topic, resume.partition)] = resume.offset
            log.info(
                "assigned %s[%d] from offset %d", resume.topic, resume.partition, resume.offset
            )
            if resume.replay is not None:
                log.info("replaying the open intent %d-%d of %s[%d] (the last run stopped inside it)",
                         resume.replay.first, resume.replay.last, resume.topic, resume.partition)  # fmt: skip
        consumer.incremental_assign(
            [TopicPartition(r.topic, r.partition, r.offset) for r in resumes]
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._wait_for_batch()  # the next owner starts after our last batch, never beside it
        for tp in partitions:
            self.metrics.forget(tp.topic, tp.partition)
            self.next_offset.pop((tp.topic, tp.partition), None)
            self.partitions.pop((tp.topic, tp.partition), None)
        consumer.incremental_unassign(partitions)

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
        (projector/catch_up.py) or `stop_at` (a `time.monotonic()` instant); `tick` runs between
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
            self.config.subscription(), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        next_finish_check = time.monotonic()
        next_waiting_report = next_finish_check + FIRST_WAITING_REPORT_S
        try:
            while not self.stopping:
                messages = self.consumer.consume(
                    self.config.max_batch_messages, self.config.max_batch_wait_ms / 1000
                )
                fresh = 0
                for msg in messages:
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                            continue
                        raise KafkaException(error)
                    fresh += 1
                    self.partitions[(msg.topic(), msg.partition())].buffer.append(msg)  # type: ignore[index]
                self._flush(drain=fresh < self.config.max_batch_messages)
                if self._in_flight is not None and self._in_flight.done():
                    self._wait_for_batch()  # an idle loop still records the last batch
                self._report_progress()
                self._ensure_read_models()
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
                    if with_retries(finish_line.reached, "checking the finish line"):
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
        log.info(
            "stopped: %d events applied (%d by the fast path), %d dead letters",
            self.applied_events, self.fast_events, self.dead_letters,
        )  # fmt: skip
        return 0

    def _flush(self, drain: bool) -> None:
        """Cut every batch that is ready and hand it to the apply thread, one at a time and in
        order: while ClickHouse applies one batch (chDB releases the GIL), this thread consumes
        and prepares the next.

        Replay first: while an open intent waits for its replay, no other batch is applied (the
        read models' deltas of a half-applied batch are exact only against the state it saw:
        projector/materialize.py)."""
        replaying = [key for key, state in self.partitions.items() if state.replay is not None]
        for (topic, partition), state in list(self.partitions.items()):
            if replaying and (topic, partition) not in replaying:
                continue
            while state.buffer:
                batch_msgs, state.buffer = cut_batch(  # type: ignore[assignment]
                    state.buffer, offset_of, state.replay, self.config.max_batch_messages, drain
                )
                if not batch_msgs:
                    break
                batch = BatchRange(
                    topic, partition, offset_of(batch_msgs[0]), offset_of(batch_msgs[-1])
                )
                messages = KafkaMessages(batch_msgs)
                segments = self.applier.plan(messages)  # while the batch in flight applies
                self._wait_for_batch()  # at most one batch in flight
                self._in_flight = self._apply_thread.submit(
                    self._commit_with_retries, batch, messages, segments
                )
                state.replay = None
                if self.stopping:
                    return

    def _wait_for_batch(self) -> None:
        """Wait for the batch in flight (re-raising its failure), then tell Kafka."""
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        batch = future.result()
        self.next_offset[(batch.topic, batch.partition)] = batch.last + 1
        if (batch.topic, batch.partition) in self.partitions:
            acknowledge(self.consumer, batch)

    def _report_progress(self) -> None:
        """Lag per assigned partition into the metrics (once a second), and the read models'
        watermarks (every ten seconds, when transaction metadata is on)."""
        now = time.monotonic()
        if now < self._next_progress_report:
            return
        self._next_progress_report = now + 1
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
        if self.config.transaction_metadata and now >= self._next_watermark_report:
            self._next_watermark_report = now + 10
            for model in self.read_model_list:
                collections = [f"{self.config.read_model_schema}.{s}" for s in model.sources]
                mark = self.ledger.watermark(collections, self._watermarks.get(model.name))
                if mark is not None:
                    self._watermarks[model.name] = mark
                    self.metrics.watermark_lsn.labels(model.name).set(mark.lsn)
        if self.config.transaction_metadata and now >= self._next_prune:
            self._next_prune = now + self.config.ledger_prune_interval_s
            try:
                pruned = self.ledger.prune()
            except TRANSIENT as exc:
                log.warning("pruning the transaction ledger failed (tried again later): %s", exc)
            else:
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
        for line in with_retries(maintainer.ensure, "starting read models"):
            log.info("read models: %s", line)
        if maintainer.building:
            progress = with_retries(maintainer.backfill_step, "backfilling read models")
            if progress is not None:
                log.info("read models: %s", progress)
            return  # the next chunk on the next round, between batches
        self._next_read_model_check = time.monotonic() + 3

    def _finish_read_models(self) -> None:
        """At the finish line: every read model whose sources exist is started and built."""
        while True:
            self._next_read_model_check = 0.0
            self._ensure_read_models()
            if self.read_models is None or not self.read_models.building:
                return

    def _commit_with_retries(
        self, batch: BatchRange, messages: KafkaMessages, segments: list[Segment] | None
    ) -> BatchRange:
        def attempt() -> None:
            self.committer.commit(batch, lambda rng: self._apply(rng, messages, segments))

        with_retries(
            attempt,
            f"applying {batch.topic}[{batch.partition}] {batch.first}-{batch.last}",
            stop=lambda: self.stopping,
        )
        return batch

    def _apply(
        self, batch: BatchRange, messages: KafkaMessages, segments: list[Segment] | None
    ) -> None:
        if batch.topic == self.config.transaction_topic:
            self.ledger.record_ends(batch, self._transaction_events(batch, messages))
            return
        started = time.monotonic()
        outcome = self.applier.apply(batch, messages, self._dead_letter, segments, planned=True)
        if self.read_models is not None:
            kept = time.monotonic()
            schema, table = source_table_of(batch.topic)
            self.read_models.apply_batch(batch, schema, table)
            self.metrics.read_model_seconds.labels(table).observe(time.monotonic() - kept)
        self.ledger.record_progress(batch, outcome.transactions, outcome.dead_transactions)
        self.applied_events += outcome.applied
        self.fast_events += outcome.applied if outcome.fast else 0
        path = "fast" if outcome.fast else "per_message"
        self.metrics.batch_seconds.labels(path).observe(time.monotonic() - started)
        table = ".".join(source_table_of(batch.topic))
        self.metrics.events_applied.labels(table, path).inc(outcome.applied)
        if outcome.dead:
            self.metrics.dead_letters.labels(batch.topic).inc(len(outcome.dead))
        self.dead_letters += len(outcome.dead)

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

    def _dead_letter(self, batch: BatchRange, letters: list[DeadLetter]) -> None:
        self.dlq.add(batch, letters)
        for letter in letters:
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


class _RunProgress:
    """The finish line's view of a running projector (projector/catch_up.py, `Progress`)."""

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
