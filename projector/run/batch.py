"""One batch, on the apply thread: its replica rows, its ledger progress, its dead letters,
all inside the commit protocol's intent (projector/commit/checkpoint.py, steps 1-5), retried
while ClickHouse or the registry is away. The read models follow the committed replicas on a
stage of their own (projector/read_models/stage.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer

from projector.commit.checkpoint import BatchCommitter, BatchRange, Claim
from projector.commit.dead_letters import DeadLetter, DeadLetterStore
from projector.commit.ledger import TransactionLedger
from projector.commit.transactions import EventPlace
from projector.config import ProjectorConfig
from projector.errors import PoisonMessage
from projector.kafka import table_of
from projector.messages import KafkaMessages, RawMessage
from projector.metrics import ProjectorMetrics
from projector.replicas.apply import BatchApplier
from projector.replicas.events import BatchOutcome, decode
from projector.replicas.fast_path import Segment
from projector.replicas.topic_guard import TopicGuard
from projector.run.retries import with_retries
from schemas.errors import NotConfluentFramed, SchemaError, UnknownSchema
from schemas.registry import SchemaCache

log = logging.getLogger("projector")


class BatchWork:
    """What applying a batch does, and the run's counts of it."""

    def __init__(
        self,
        config: ProjectorConfig,
        committer: BatchCommitter,
        applier: BatchApplier,
        ledger: TransactionLedger,
        guard: TopicGuard,
        dlq: DeadLetterStore,
        producer: Producer,
        schemas: SchemaCache,
        metrics: ProjectorMetrics,
        stopping: Callable[[], bool],
        after_commit: Callable[[BatchRange], None] = lambda batch: None,
    ) -> None:
        """`after_commit`: a report on each committed batch (never its failure)."""
        self.config, self.committer, self.applier = config, committer, applier
        self.ledger, self.guard = ledger, guard
        self.dlq, self.producer, self.schemas = dlq, producer, schemas
        self.metrics, self.stopping, self.after_commit = metrics, stopping, after_commit
        self.applied_events = 0
        self.fast_events = 0  # of which applied by the fast path
        self.dead_letters = 0

    def commit(
        self,
        batch: BatchRange,
        messages: KafkaMessages,
        segments: list[Segment] | None,
        counted: bool = False,
        claim: Claim | None = None,
    ) -> BatchRange:
        """Apply `batch` under its intent, retrying transient failures until it is done or the
        run stops (then the intent is replayed by whoever positions the partition next);
        `claim`: the claim it was cut under (`BatchCommitter.commit`)."""

        def attempt() -> None:
            self.committer.commit(
                batch, lambda rng: self._apply(rng, messages, segments, counted), claim
            )

        with_retries(
            attempt,
            f"applying {batch.topic}[{batch.partition}] {batch.first}-{batch.last}",
            stop=self.stopping,
        )
        self.after_commit(batch)
        return batch

    def _apply(
        self,
        batch: BatchRange,
        messages: KafkaMessages,
        segments: list[Segment] | None,
        counted: bool = False,
    ) -> None:
        """Apply one batch: its replica rows and its ledger progress (none when `counted`:
        re-read after a reset, its events were counted when first applied)."""
        if batch.topic == self.config.transaction_topic:
            self.ledger.record_ends(batch, self._transaction_events(batch, messages))
            return
        stopped = self.guard.stopped_reason(batch.topic, messages.key_schema_ids())
        if stopped is not None:
            self._refuse(batch, messages, stopped)
            return
        started = time.monotonic()
        outcome = self.applier.apply(batch, messages, self.dead_letter, segments, planned=True)
        if outcome.stop is not None:  # every later message of the table goes to the DLQ
            log.error(
                "%s stops: %s", table_of(batch.topic), self.guard.stop(batch.topic, outcome.stop)
            )
        if counted:
            self.metrics.events_reread.labels(table_of(batch.topic)).inc(outcome.applied)
        else:
            self.ledger.record_progress(batch, outcome.transactions, outcome.dead_transactions)
        self.applied_events += outcome.applied
        self.fast_events += outcome.applied if outcome.fast else 0
        path = "fast" if outcome.fast else "per_message"
        self.metrics.batch_seconds.labels(path).observe(time.monotonic() - started)
        self.metrics.events_applied.labels(table_of(batch.topic), path).inc(outcome.applied)
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
            log.warning(
                "%d dead letters %s[%d]@%d-%d (topic): %s",
                len(letters),
                batch.topic,
                batch.partition,
                batch.first,
                batch.last,
                reason,
            )
            self.dead_letter(batch, letters, log_each=False)
            self.metrics.dead_letters.labels(batch.topic).inc(len(letters))
            self.dead_letters += len(letters)
        self.ledger.record_progress(batch, {}, dead.dead_transactions)

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
            except (
                SchemaError,
                UnknownSchema,
                NotConfluentFramed,
                ValueError,
                EOFError,
                TypeError,
                IndexError,
            ) as exc:
                log.error(
                    "unreadable event at offset %d of the transaction topic: read models' "
                    "watermarks stop there until it is replayed: %s",
                    message.offset,
                    exc,
                )
                events.append((message.offset, None))
                reason = f"undecodable transaction event: {type(exc).__name__}: {exc}"
                letters.append(DeadLetter.of(message, PoisonMessage("decode", reason)))
        if letters:
            self.dead_letter(batch, letters)
        return events

    def dead_letter(
        self, batch: BatchRange, letters: list[DeadLetter], log_each: bool = True
    ) -> None:
        """Into the DLQ table (under the batch's token) and onto the DLQ topic."""
        self.dlq.add(batch, letters)
        for letter in letters:
            if log_each:
                log.warning(
                    "dead letter %s[%d]@%d (%s): %s",
                    letter.topic,
                    letter.partition,
                    letter.offset,
                    letter.stage,
                    letter.error,
                )
            self.producer.produce(
                self.config.dlq_topic,
                key=letter.key,
                value=letter.value,
                headers={
                    "origin.topic": letter.topic,
                    "origin.partition": str(letter.partition),
                    "origin.offset": str(letter.offset),
                    "stage": letter.stage,
                    "error": letter.error[:1000],
                },
            )
        self.producer.poll(0)
