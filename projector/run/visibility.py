"""Commit to visible, per table and per read model, counted from ClickHouse's own rows.

After each batch of a table is committed, one query over that batch's rows in the replica (found
by `_partition` and `_offset`, the minmax index every replica has) counts per row version its
`_commit_ts` (Postgres' commit, Debezium's `ts_ms`) until `_ingested_at` (ClickHouse's clock when
the row was inserted: when a reader of the replica can see it) and until now (the batch's read
models were kept in the same commit, so a reader sees them from now on), already bucketed, into
`projector_commit_to_visible_seconds{table}` and `projector_read_model_commit_to_visible_seconds
{read_model}`. One observation per version a reader could see: versions of a key superseded
inside the same batch never were (ClickHouse applies the replica's ReplacingMergeTree to each
insert, `optimize_on_insert`), and the deletion markers of one truncate are one event. The alert
rules (projector/alerts.yml) read the histograms' p99.

A report only: a failing query is logged (once a minute) and counted as a chore failure, never
the batch's.
"""

from __future__ import annotations

import logging
import time

from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import BatchRange
from projector.config import ProjectorConfig
from projector.kafka import source_table_of
from projector.metrics import VISIBLE_BUCKETS, ProjectorMetrics
from projector.read_models.definitions import ReadModel
from projector.replicas.catalog import ReplicaCatalog

log = logging.getLogger("projector")
LOG_REPEAT_S = 60.0
NAME = "reporting commit to visible"


class VisibilityReport:
    def __init__(
        self,
        ch: ClickHouse,
        catalog: ReplicaCatalog,
        metrics: ProjectorMetrics,
        config: ProjectorConfig,
        read_models: list[ReadModel],
    ) -> None:
        self.ch, self.catalog, self.metrics, self.config = ch, catalog, metrics, config
        self.read_models = read_models if config.maintain_read_models else []
        self._logged = -1e18

    def after_commit(self, batch: BatchRange) -> None:
        if batch.topic == self.config.transaction_topic:
            return
        try:
            self._observe(batch)
        except Exception as exc:  # a report: never the batch's failure
            self.metrics.chore_failures.labels(NAME).inc()
            if time.monotonic() - self._logged >= LOG_REPEAT_S:
                self._logged = time.monotonic()
                log.warning("%s failed (the run goes on): %s", NAME, exc)

    def _observe(self, batch: BatchRange) -> None:
        schema, table = source_table_of(batch.topic)
        replica = self.catalog.existing(schema, table)
        if replica is None:
            return
        r_buckets = ", ".join(f"countIf(r <= {b})" for b in VISIBLE_BUCKETS)
        m_buckets = ", ".join(f"countIf(m <= {b})" for b in VISIBLE_BUCKETS)
        rows = self.ch.rows(
            f"""SELECT count() AS n, sum(r) AS r_sum, sum(m) AS m_sum,
                       [{r_buckets}] AS r_buckets, [{m_buckets}] AS m_buckets
                FROM (SELECT greatest(0, min(dateDiff('millisecond', _commit_ts, _ingested_at)))
                               / 1000 AS r,
                             greatest(0, min(dateDiff('millisecond', _commit_ts, now64(3))))
                               / 1000 AS m
                      FROM {replica.qualified}
                      WHERE _partition = {int(batch.partition)}
                        AND _offset BETWEEN {int(batch.first)} AND {int(batch.last)}
                        AND _commit_ts > toDateTime64('2000-01-01 00:00:00', 3, 'UTC')
                      GROUP BY _offset)"""
        )
        if not rows or not int(rows[0]["n"]):
            return
        row = rows[0]
        count = int(row["n"])
        label = f"{schema}.{table}"
        self.metrics.commit_to_visible.add(label, row["r_buckets"], count, float(row["r_sum"]))
        if schema != self.config.read_model_schema:
            return
        for model in self.read_models:
            if table in model.sources:
                self.metrics.read_model_commit_to_visible.add(
                    model.name, row["m_buckets"], count, float(row["m_sum"])
                )
