"""What the ops page shows, sampled in the background every `interval_s`:

| item | from |
|---|---|
| per read model: state, watermark, its age | the consistency tracker (queries/consistency.py) |
| lag in events | ClickHouse checkpoints against Kafka's end offsets (right even while no projector runs) |
| lag in seconds | the running projector's `/metrics` (`projector_consumer_lag_seconds`), when it answers |
| dead letters | `projector.dlq` in ClickHouse |
| connector | Kafka Connect's REST API (`CONNECT_URL`) |
| replication slot | Postgres' `pg_replication_slots` (`ADMIN_DSN`): active, WAL it retains |

A source that does not answer shows as such ("unreachable: why"); it never fails the page.
`history` keeps the last `history_s` seconds of lag for the chart.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import PROJECTION, CheckpointStore
from projector.commit.dead_letters import DeadLetterStore
from projector.kafka import table_of
from projector.operations.status import connector_state, replication_slot, unreachable_or
from projector.redaction import redact_values
from queries.consistency import ReadPositions

log = logging.getLogger("queries")


class OpsMonitor:
    def __init__(
        self,
        ch: ClickHouse,
        positions: ReadPositions,
        control_database: str,
        kafka_bootstrap: str,
        metrics_url: str | None,
        env: Mapping[str, str],
        interval_s: float = 2.0,
        history_s: float = 600.0,
        wal_warning_bytes: int = 1 << 30,
        transaction_topic: str | None = None,
    ) -> None:
        self.ch = ch
        self.positions = positions
        self.checkpoints = CheckpointStore(ch, control_database, PROJECTION)
        self.dlq = DeadLetterStore(ch, control_database, PROJECTION)
        self.kafka_bootstrap = kafka_bootstrap
        self.metrics_url = metrics_url
        self.env = dict(env)
        self.wal_warning_bytes = wal_warning_bytes
        self.transaction_topic = transaction_topic
        self.interval_s = interval_s
        self.history: deque[dict[str, Any]] = deque(maxlen=max(2, int(history_s / interval_s)))
        self.latest: dict[str, Any] = {"sampled_at_ms": None}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ops-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._consumer is not None and (self._thread is None or not self._thread.is_alive()):
            consumer, self._consumer = self._consumer, None
            consumer.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a sampling bug must not end the sampling
                log.exception("ops sample failed")
            self._stop.wait(self.interval_s)

    def status(self) -> dict[str, Any]:
        """The latest sample and the history, redacted (it is served: URLs with passwords and
        errors that quote them never leave)."""
        return redact_values({**self.latest, "history": list(self.history)})

    # ---- one sample ----------------------------------------------------------------------

    def sample(self) -> None:
        now_ms = int(time.time() * 1000)
        lag = unreachable_or(self._lag_events)
        seconds = unreachable_or(self._lag_seconds)
        projections = unreachable_or(lambda: self._projections(now_ms))
        sample = {
            "sampled_at_ms": now_ms,
            "projections": projections,
            "lag": {"events": lag, "seconds": seconds},
            "dead_letters": unreachable_or(self._dead_letters),
            "connector": unreachable_or(self._connector),
            "replication_slot": unreachable_or(self._slot),
        }
        self.latest = sample
        self.history.append(
            {
                "t_ms": now_ms,
                "events": lag.get("total") if isinstance(lag, dict) else None,
                "seconds": seconds.get("max") if isinstance(seconds, dict) else None,
                "tables": _furthest_behind(lag.get("tables", {}) if isinstance(lag, dict) else {}),
            }
        )

    def _projections(self, now_ms: int) -> dict[str, Any]:
        positions = self.positions.current(fresh=True)
        out = {}
        for name, p in sorted(positions.items()):
            if p.lsn == 0:
                state = "no transaction recorded yet"
            elif p.waiting_for:
                state = f"waiting for transaction {p.waiting_for}"
            else:
                state = "current"
            out[name] = {
                "state": state,
                "watermark_lsn": p.lsn_text if p.lsn else None,
                "watermark_tx": p.watermark.tx_id if p.watermark else None,
                "watermark_age_s": round((now_ms - p.commit_ms) / 1000, 1) if p.commit_ms else None,
                "sources": self.positions.tracker.groups.get(name, []),
            }
        if self.positions.trouble:
            out["_trouble"] = {"state": f"unreachable: {self.positions.trouble}"}
        return out

    def _lag_events(self) -> dict[str, Any]:
        from confluent_kafka import Consumer, TopicPartition

        if self._consumer is None:
            self._consumer = Consumer(
                {
                    "bootstrap.servers": self.kafka_bootstrap,
                    "group.id": f"projector-ops-{uuid.uuid4()}",
                }
            )
        partitions = []
        for (topic, partition), checkpoint in sorted(self.checkpoints.load().items()):
            _, end = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=5, cached=False
            )
            behind = max(0, end - checkpoint.resume_offset)
            partitions.append({"topic": topic, "partition": partition, "lag": behind})
        tables: dict[str, int] = {}  # events behind per source table (SCHEMA.TABLE)
        for p in partitions:
            if p["topic"] != self.transaction_topic and p["topic"].count(".") >= 2:
                table = table_of(p["topic"])
                tables[table] = tables.get(table, 0) + p["lag"]
        return {
            "total": sum(p["lag"] for p in partitions),
            "partitions": partitions,
            "tables": tables,
        }

    def _lag_seconds(self) -> dict[str, Any]:
        if not self.metrics_url:
            return {"max": None, "note": "no projector metrics URL configured"}
        from projector.operations.status import collect_live_status_at

        report = collect_live_status_at(self.metrics_url)
        if report is None:
            return {
                "max": None,
                "note": f"the projector's metrics at {self.metrics_url} do not answer",
            }
        values = [p.get("lag_seconds", 0.0) for p in report["partitions"]]
        return {"max": max(values, default=0.0)}

    def _dead_letters(self) -> int:
        return self.dlq.count()

    def _connector(self) -> dict[str, Any]:
        return connector_state(self.env)

    def _slot(self) -> dict[str, Any]:
        return replication_slot(self.env, self.wal_warning_bytes)


HISTORY_TABLES = 50  # tables kept per history sample (the furthest behind): bounded payloads


def _furthest_behind(tables: dict[str, int]) -> dict[str, int]:
    return dict(sorted(tables.items(), key=lambda item: (-item[1], item[0]))[:HISTORY_TABLES])
