"""Prometheus metrics of one projector process, served at `http://127.0.0.1:<metrics_port>/metrics`.

| metric | labels | meaning |
|---|---|---|
| `projector_events_applied_total` | table, path | change events applied (`path`: fast or per_message) |
| `projector_events_reread_total` | table | events applied again after `projector reset` moved the table back (also in events_applied) |
| `projector_batch_seconds` | path | time to apply one batch, intent to done record |
| `projector_read_model_seconds` | table | time to recompute the read models over one range of a source table (the stage, beside the batches) |
| `projector_consumer_lag_offsets` | topic, partition | end offset - next offset to apply |
| `projector_consumer_lag_seconds` | topic, partition | now - Kafka timestamp of the oldest event read but not applied; 0 when the partition is applied to its end |
| `projector_dead_letters_total` | topic | messages sent to the dead-letter queue |
| `projector_watermark_lsn` | read_model | LSN of the read model's consistency watermark |
| `projector_commit_to_visible_seconds` | table | per change event: its Postgres commit until its row is in the replica (ClickHouse's clock at the insert); counted from ClickHouse's own rows after each batch |
| `projector_read_model_commit_to_visible_seconds` | read_model | per change event of a source table: its Postgres commit until the read model kept in the same batch is written |
| `projector_slot_active` | slot | 1 while the connector's replication slot is active (read every 15 s) |
| `projector_slot_inactive_seconds` | slot | how long the slot has been inactive, as this process saw it (0 while active) |
| `projector_slot_retained_wal_bytes` | slot | WAL the slot keeps Postgres from recycling |
| `projector_slot_wal_headroom_ratio` | slot | WAL the slot may still retain before Postgres invalidates it (`safe_wal_size`) over `max_slot_wal_keep_size`; NaN when that is unlimited |
| `projector_chore_failures_total` | chore | failures of a between-batch chore (lag, watermarks, ledger pruning): logged and retried, the run goes on; alert when it keeps growing |

Lag in seconds is measured from the Kafka timestamp of the waiting event, which Kafka Connect sets
when Debezium hands the event over: it is the commit time plus Debezium's own delay (measured by
`projector freshness`, part of `make bench`, docs/benchmarks.md). When a partition is applied to its end its lag is 0,
not the age of its last event, so an idle projector shows no lag.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Commit to visible: a healthy pipeline is well under a second; a backlog, minutes.
VISIBLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class BulkHistogram(Collector):
    """A Prometheus histogram that takes a batch's observations already counted per bucket (by
    ClickHouse, from the rows themselves): one call a batch, not one per event."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]):
        self.name, self.documentation, self.label = name, documentation, label
        self.buckets = tuple(buckets)
        self._series: dict[str, tuple[list[int], float]] = {}  # label → (cumulative, sum)
        self._lock = threading.Lock()

    def add(self, value: str, cumulative: Sequence[int], count: int, total: float) -> None:
        """`cumulative[i]`: observations <= buckets[i]; `count`: all of them; `total`: their sum."""
        with self._lock:
            counts, seen = self._series.get(value, ([0] * (len(self.buckets) + 1), 0.0))
            for index, n in enumerate([*cumulative, count]):
                counts[index] += int(n)
            self._series[value] = (counts, seen + float(total))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            for value, (counts, total) in sorted(self._series.items()):
                bounds = [*(str(b) for b in self.buckets), "+Inf"]
                family.add_metric([value], list(zip(bounds, counts, strict=True)), total)
        yield family


class ProjectorMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.events_applied = Counter(
            "projector_events_applied",
            "Change events applied to replica tables.",
            ["table", "path"],
            registry=registry,
        )
        self.events_reread = Counter(
            "projector_events_reread",
            "Change events applied again after `projector reset` moved a table back (also in "
            "projector_events_applied).",
            ["table"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "projector_batch_seconds",
            "Time to apply one batch, intent to done record.",
            ["path"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.read_model_seconds = Histogram(
            "projector_read_model_seconds",
            "Time to recompute the read models over one range of a source table's replica.",
            ["table"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.lag_offsets = Gauge(
            "projector_consumer_lag_offsets",
            "End offset minus the next offset to apply.",
            ["topic", "partition"],
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "projector_consumer_lag_seconds",
            "Now minus the Kafka timestamp of the oldest event read but not applied "
            "(0 when applied to the end).",
            ["topic", "partition"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "projector_dead_letters",
            "Messages sent to the dead-letter queue.",
            ["topic"],
            registry=registry,
        )
        self.chore_failures = Counter(
            "projector_chore_failures",
            "Failures of a between-batch chore (logged, retried).",
            ["chore"],
            registry=registry,
        )
        self.watermark_lsn = Gauge(
            "projector_watermark_lsn",
            "LSN of the read model's consistency watermark.",
            ["read_model"],
            registry=registry,
        )
        self.commit_to_visible = BulkHistogram(
            "projector_commit_to_visible_seconds",
            "Per change event: its Postgres commit until its row is in the replica.",
            "table",
            VISIBLE_BUCKETS,
        )
        registry.register(self.commit_to_visible)
        self.read_model_commit_to_visible = BulkHistogram(
            "projector_read_model_commit_to_visible_seconds",
            "Per change event of a source table: its Postgres commit until the read model is kept.",
            "read_model",
            VISIBLE_BUCKETS,
        )
        registry.register(self.read_model_commit_to_visible)
        self.slot_active = Gauge(
            "projector_slot_active",
            "1 while the connector's replication slot is active.",
            ["slot"],
            registry=registry,
        )
        self.slot_inactive_seconds = Gauge(
            "projector_slot_inactive_seconds",
            "How long the replication slot has been inactive, as this process saw it.",
            ["slot"],
            registry=registry,
        )
        self.slot_retained_wal_bytes = Gauge(
            "projector_slot_retained_wal_bytes",
            "WAL the replication slot keeps Postgres from recycling.",
            ["slot"],
            registry=registry,
        )
        self.slot_wal_headroom_ratio = Gauge(
            "projector_slot_wal_headroom_ratio",
            "WAL the slot may still retain before it is invalidated, over max_slot_wal_keep_size "
            "(NaN: unlimited).",
            ["slot"],
            registry=registry,
        )
        self.table_paused = Gauge(
            "projector_table_paused",
            "1 while `projector pause` holds the table back here.",
            ["table"],
            registry=registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def serve_or_warn(self, port: int, host: str) -> None:
        """`serve`, or a warning when the port is taken (the run goes on without metrics)."""
        try:
            self.serve(port, host)
            logging.getLogger("projector").info("metrics at http://127.0.0.1:%d/metrics", port)
        except OSError as exc:
            logging.getLogger("projector").warning(
                "no metrics endpoint: port %d: %s (set PROJECTOR_METRICS_PORT)", port, exc
            )

    def set_lag(
        self, topic: str, partition: int, end: int, next_offset: int, oldest_waiting_ms: int | None
    ) -> None:
        behind = max(0, end - next_offset)
        self.lag_offsets.labels(topic, str(partition)).set(behind)
        seconds = 0.0
        if behind and oldest_waiting_ms:
            seconds = max(0.0, time.time() - oldest_waiting_ms / 1000)
        self.lag_seconds.labels(topic, str(partition)).set(seconds)

    def forget(self, topic: str, partition: int) -> None:
        """A revoked partition is another member's to report."""
        for gauge in (self.lag_offsets, self.lag_seconds):
            try:
                gauge.remove(topic, str(partition))
            except KeyError:
                pass
