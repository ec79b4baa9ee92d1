"""The replication slot's health in the metrics (projector/run/reports.py, `SlotReport`)."""

from __future__ import annotations

import math

from projector.metrics import ProjectorMetrics
from projector.run.reports import SlotReport, setting_bytes


def test_size_settings_read_as_postgres_shows_them() -> None:
    assert setting_bytes("-1") is None
    assert setting_bytes("1024MB") == 1024 * 1024**2
    assert setting_bytes("10GB") == 10 * 1024**3
    assert setting_bytes("512kB") == 512 * 1024
    assert setting_bytes("64") == 64 * 1024**2


def test_inactive_time_and_headroom() -> None:
    now = [100.0]
    metrics = ProjectorMetrics()
    report = SlotReport("postgresql://unused", "projector_slot", metrics, clock=lambda: now[0])

    def value(gauge: object) -> float:
        return gauge.labels("projector_slot")._value.get()  # type: ignore[attr-defined]

    report.record(True, 4096, 800 * 1024**2, "1GB")
    assert value(metrics.slot_active) == 1 and value(metrics.slot_inactive_seconds) == 0
    assert math.isclose(value(metrics.slot_wal_headroom_ratio), 800 / 1024)
    assert value(metrics.slot_retained_wal_bytes) == 4096
    report.record(False, 8192, 100 * 1024**2, "1GB")
    now[0] = 400.0
    report.record(False, 8192, 100 * 1024**2, "1GB")
    assert value(metrics.slot_active) == 0 and value(metrics.slot_inactive_seconds) == 300
    report.record(True, 0, None, "-1")
    assert value(metrics.slot_inactive_seconds) == 0
    assert math.isnan(value(metrics.slot_wal_headroom_ratio))  # unlimited
