"""The chores of a run (projector/run/duties.py): lag and watermarks into the metrics, and
pruning the transaction ledger. Each is only a report or a clean-up: a late one leaves every
replica and read model exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from projector.commit.ledger import TransactionLedger
from projector.commit.transactions import Watermark
from projector.config import ProjectorConfig
from projector.metrics import ProjectorMetrics
from projector.read_models.definitions import ReadModel
from projector.read_models.stage import read_ceilings
from projector.run.duties import Chore

log = logging.getLogger("projector")
Key = tuple[str, int]


class Buffered(Protocol):
    buffer: list[Message]


def chores(
    config: ProjectorConfig,
    metrics: ProjectorMetrics,
    consumer: Consumer,
    next_offset: Mapping[Key, int],
    partitions: Mapping[Key, Buffered],
    ledger: TransactionLedger,
    read_models: list[ReadModel],
) -> list[Chore]:
    """The chores of a run, in the order they run."""

    def failed(chore: str) -> None:
        metrics.chore_failures.labels(chore).inc()

    lag = lag_reporter(metrics, consumer, next_offset, partitions)
    # Lag and the slot read nothing a batch writes: they run beside the batches in flight.
    found = [Chore("reporting lag", lag, every_s=1, failed=failed, settles=False)]
    if config.source_dsn:
        slot = SlotReport(config.source_dsn, config.slot_name, metrics)
        found.append(
            Chore(
                "reporting the replication slot",
                slot.report,
                every_s=15,
                failed=failed,
                settles=False,
            )
        )
    if config.transaction_metadata:
        marks = WatermarkReport(config, metrics, ledger, read_models)
        every_s = config.ledger_prune_interval_s
        found += [
            Chore("reporting watermarks", marks.report, every_s=10, failed=failed),
            Chore(
                "pruning the transaction ledger",
                lambda: prune_ledger(ledger),
                every_s=every_s,
                first_after_s=every_s,
                retry_s=min(60.0, every_s),
                failed=failed,
            ),
        ]
    return found


def lag_reporter(
    metrics: ProjectorMetrics,
    consumer: Consumer,
    next_offset: Mapping[Key, int],
    partitions: Mapping[Key, Buffered],
) -> Callable[[], None]:
    def report_lag() -> None:
        """Lag per assigned partition into the metrics."""
        for (topic, partition), offset in list(next_offset.items()):
            try:
                _, end = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except KafkaException:
                continue
            state = partitions.get((topic, partition))
            waiting = state.buffer[0].timestamp()[1] if state and state.buffer else None
            metrics.set_lag(topic, partition, end, offset, waiting)

    return report_lag


class WatermarkReport:
    """Each read model's watermark into the metrics; the next search starts where the last one
    found it. A materialized read model's is capped where its stage has followed its sources
    (projector/read_models/stage.py)."""

    def __init__(
        self,
        config: ProjectorConfig,
        metrics: ProjectorMetrics,
        ledger: TransactionLedger,
        read_models: list[ReadModel],
    ) -> None:
        self.config, self.metrics, self.ledger, self.read_models = (
            config,
            metrics,
            ledger,
            read_models,
        )
        self.found: dict[str, Watermark] = {}

    def report(self) -> None:
        """One that fails does not keep the others from being reported (the first failure is
        raised once they are done)."""
        failure: Exception | None = None
        ceilings = None
        if self.config.maintain_read_models:
            ceilings = read_ceilings(self.ledger.ch, self.config.control_database)
        for model in self.read_models:
            collections = [f"{self.config.read_model_schema}.{s}" for s in model.sources]
            try:
                mark = self.ledger.watermark(collections, self.found.get(model.name))
            except Exception as exc:  # reported by the chore once the others are done
                failure = failure or exc
                continue
            if mark is not None:
                self.found[model.name] = mark
                ceiling = None if ceilings is None else ceilings.get(model.name)
                if ceilings is not None and ceiling is None:
                    mark = None  # nothing reflected yet
                elif ceiling is not None and mark.lsn > ceiling.lsn:
                    end = self.ledger.newest_end(-1, ceiling.end_offset + 1, collections)
                    mark = None if end is None else end.watermark()
            if mark is not None:
                self.metrics.watermark_lsn.labels(model.name).set(mark.lsn)
        if failure is not None:
            raise failure


class SlotReport:
    """The connector's replication slot into the metrics: active (and for how long not), the WAL
    it retains, and the headroom before Postgres would invalidate it (`safe_wal_size` over
    `max_slot_wal_keep_size`; NaN when that is unlimited). Read with the projector's source login:
    `pg_replication_slots` is readable by every role."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        metrics: ProjectorMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dsn, self.slot, self.metrics, self.clock = dsn, slot, metrics, clock
        self._inactive_since: float | None = None

    def report(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, connect_timeout=5, autocommit=True) as conn:
            row = conn.execute(
                "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
                "safe_wal_size, current_setting('max_slot_wal_keep_size') "
                "FROM pg_replication_slots WHERE slot_name = %s",
                [self.slot],
            ).fetchone()
        active, retained, safe, keep = row if row is not None else (False, 0, None, "-1")
        self.record(bool(active), int(retained or 0), safe, keep)

    def record(self, active: bool, retained: int, safe: int | None, keep_setting: str) -> None:
        now = self.clock()
        if active:
            self._inactive_since = None
        elif self._inactive_since is None:
            self._inactive_since = now
        labels = self.metrics.slot_active.labels(self.slot)
        labels.set(int(active))
        inactive_s = 0.0 if self._inactive_since is None else now - self._inactive_since
        self.metrics.slot_inactive_seconds.labels(self.slot).set(inactive_s)
        self.metrics.slot_retained_wal_bytes.labels(self.slot).set(retained)
        keep = setting_bytes(keep_setting)
        ratio = float("nan") if keep is None or safe is None else max(0.0, safe / keep)
        self.metrics.slot_wal_headroom_ratio.labels(self.slot).set(ratio)


def setting_bytes(text: str) -> int | None:
    """A Postgres size setting as `current_setting` shows it (`-1`, `1024MB`, `10GB`, `512kB`)
    in bytes; None when unlimited."""
    text = text.strip()
    if text in ("-1", ""):
        return None
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text) * 1024**2  # a bare number is in megabytes (the setting's unit)


def prune_ledger(ledger: TransactionLedger) -> None:
    pruned = ledger.prune()
    if pruned:
        log.info("transaction ledger: %d settled transaction(s) pruned", pruned)
