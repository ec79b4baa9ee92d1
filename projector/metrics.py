"""Prometheus metrics of one projector process, served at `http://127.0.0.1:<metrics_port>/metrics`.

| metric | labels | meaning |
|---|---|---|
| `projector_events_applied_total` | table, path | change events applied (`path`: fast or per_message) |
| `projector_events_reread_total` | table | events applied again after `projector reset` moved the table back (also in events_applied) |
| `projector_batch_seconds` | path | time to apply one batch, intent to done record |
| `projector_read_model_seconds` | table | time to keep the read models for one batch of a source table (part of the batch) |
| `projector_consumer_lag_offsets` | topic, partition | end offset - next offset to apply |
| `projector_consumer_lag_seconds` | topic, partition | now - Kafka timestamp of the oldest event read but not applied; 0 when the partition is applied to its end |
| `projector_dead_letters_total` | topic | messages sent to the dead-letter queue |
| `projector_watermark_lsn` | read_model | LSN of the read model's consistency watermark |
| `projector_chore_failures_total` | chore | failures of a between-batch chore (lag, watermarks, ledger pruning): logged and retried, the run goes on; alert when it keeps growing |

Lag in seconds is measured from the Kafka timestamp of the waiting event, which Kafka Connect sets
when Debezium hands the event over: it is the commit time plus Debezium's own delay (measured by
`projector freshness`, part of `make bench`, docs/benchmarks.md). When a partition is applied to its end its lag is 0,
not the age of its last event, so an idle projector shows no lag.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
            "Time to keep the read models for one batch of a source table.",
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
        self.table_paused = Gauge(
            "projector_table_paused",
            "1 while `projector pause` holds the table back here.",
            ["table"],
            registry=registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

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
