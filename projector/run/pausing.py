"""`projector pause | resume`, honoured between batches (a duty: projector/run/duties.py).

The command records which tables it wants paused (projector/operations/pauses.py). Every
PAUSE_CHECK_S the running member reads that, and with no batch in flight pauses the partitions
it holds of those tables, or resumes them: a table stops after a whole batch, so its read models'
watermarks hold where its transactions stop. A partition with an open intent is replayed first,
then paused. Resuming positions the partition afresh (steps A-C): while it was paused its
checkpoint may have moved (`projector reset`, checkpoint.py R1-R3). What the member did is
recorded for the command to wait on, also for partitions paused at assignment (no ClickHouse
inside a rebalance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import Consumer, TopicPartition

from projector.kafka import table_of
from projector.metrics import ProjectorMetrics
from projector.operations.pauses import TablePauses
from projector.run.partitions import PartitionState
from projector.run.retries import TRANSIENT

log = logging.getLogger("projector")
T = TypeVar("T")
Key = tuple[str, int]
PAUSE_CHECK_S = 1.0  # how often it reads which tables `projector pause` paused


class TablePausing:
    """The pause duty, and which partitions are paused (the loop's `_flush` skips them)."""

    name = "honouring table pauses"

    def __init__(
        self,
        pauses: TablePauses,
        consumer: Consumer,
        partitions: Mapping[Key, PartitionState],
        next_offset: Mapping[Key, int],
        release: Callable[[list[Key]], None],
        retries: Callable[[Callable[[], Any], str], Any],
        metrics: ProjectorMetrics,
        wanted: set[str],
    ) -> None:
        """`partitions`, `next_offset`: the loop's own, read here; `release`: positions partitions
        afresh (steps A-C) and fetches them again; `retries`: the loop's, polling meanwhile."""
        self.pauses, self.consumer, self.metrics = pauses, consumer, metrics
        self.partitions, self.next_offset = partitions, next_offset
        self.release, self.retries = release, retries
        self.wanted = wanted  # SCHEMA.TABLE asked to be paused, as last read
        self.paused: set[Key] = set()  # partitions held back by `projector pause`
        self._recorded: dict[str, bool] = {}  # what this member recorded it did
        self._next_check = 0.0

    def pause_on_assign(self, keys: list[Key]) -> list[Key]:
        """Of newly positioned partitions without a replay, those to pause at once."""
        paused = [key for key in keys if table_of(key[0]) in self.wanted]
        self.paused.update(paused)
        return paused

    def forget(self, key: Key) -> None:
        self.paused.discard(key)

    def due(self, now: float) -> bool:
        if now < self._next_check:
            return False
        self._next_check = now + PAUSE_CHECK_S
        try:
            self.wanted = self.pauses.wanted()
        except TRANSIENT:
            return False  # read on a later round
        to_pause, to_resume = self._moves()
        return bool(to_pause or to_resume or self._unrecorded())

    def run(self) -> None:
        to_pause, to_resume = self._moves()
        if to_pause or to_resume:
            self.consumer.pause([TopicPartition(topic, partition) for topic, partition in to_pause])
            self.paused.update(to_pause)
            self.release(to_resume)  # still counted paused: no retry inside resumes them early
            self.paused.difference_update(to_resume)
        for table, paused in sorted(self._unrecorded().items()):
            log.info(
                "%s %s (projector %s)",
                "paused" if paused else "resumed",
                table,
                "pause" if paused else "resume",
            )
            self.retries(partial(self.pauses.record, table, paused), "recording a pause")
            self._recorded[table] = paused
            self.metrics.table_paused.labels(table).set(int(paused))

    def _moves(self) -> tuple[list[Key], list[Key]]:
        pause = [
            key
            for key, state in self.partitions.items()
            if key in self.next_offset
            and key not in self.paused
            and state.replay is None
            and table_of(key[0]) in self.wanted
        ]
        resume = [key for key in self.paused if table_of(key[0]) not in self.wanted]
        return pause, resume

    def _unrecorded(self) -> dict[str, Any]:
        """Tables whose pause state differs from what this member recorded (a revoked table's
        partitions are not ours to record resumed while it is still wanted paused)."""
        now_paused = {table_of(topic) for topic, _ in self.paused}
        return {
            table: table in now_paused
            for table in now_paused | set(self._recorded)
            if self._recorded.get(table) != (table in now_paused)
            and (table in now_paused or table not in self.wanted)
        }
