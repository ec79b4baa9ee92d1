"""The running projector's Prometheus endpoint and `projector status` report what happened."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@one_backend("chdb")
def test_metrics_count_events_lag_and_dead_letters(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    port = free_port()
    projector.env["PROJECTOR_METRICS_PORT"] = str(port)
    table = projector.table("mx_orders")
    topic = f"cdc.public.{table}"
    started = time.monotonic()
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, placed date, qty int)")
    stack.apply()
    for i in range(30):
        stack.sql(f"INSERT INTO {table} VALUES (%s, '2024-01-01', %s)", [i, i])
    stack.sql(f"UPDATE {table} SET qty = qty + 1 WHERE id < 5")  # 5 events
    stack.sql(f"DELETE FROM {table} WHERE id >= 27")  # 3 events (+ 3 tombstones)
    path = "fast"  # on either backend: plain types, no TOAST, no truncate
    key = ("projector_events_applied_total", (("path", path), ("table", f"public.{table}")))
    dead_key = ("projector_dead_letters_total", (("topic", topic),))
    lag_key = ("projector_consumer_lag_offsets", (("partition", "0"), ("topic", topic)))
    process = projector.start()
    try:
        # 38 changes, plus snapshot reads of whichever rows the table's first (incremental)
        # snapshot found: Kafka, read independently, says how many events there are.
        wait_for(port, lambda m: m.get(key, 0) >= 30 + 5 + 3 and m.get(lag_key) == 0)
        changes = [m for m in stack.messages_to_end(topic) if m.value() is not None]
        expected_events, keys = len(changes), {m.key() for m in changes}
        stack.sql(f"INSERT INTO {table} VALUES (99, '2400-01-01', 0)")  # a dead letter (> 2299)
        wait_for(port, lambda m: m.get(dead_key, 0) >= 1)
        time.sleep(3)  # idle for a while: lag must stay 0, not grow with the last event's age
        metrics = scrape(port)
        labels = (("partition", "0"), ("topic", topic))
        assert metrics[key] == expected_events, metrics
        assert metrics[dead_key] == 1
        assert metrics[("projector_consumer_lag_offsets", labels)] == 0
        assert metrics[("projector_consumer_lag_seconds", labels)] == 0
        assert metrics[("projector_batch_seconds_count", (("path", path),))] >= 1
        # Commit to visible: one observation per row version a batch made visible, from the
        # replica's own rows. Versions of a key superseded inside one batch never were (the
        # replica's engine keeps a key's last version of an insert), so between one per key the
        # events touched and one per event; a lone change adds exactly one.
        visible = (("table", f"public.{table}"),)
        count_key = ("projector_commit_to_visible_seconds_count", visible)
        assert len(keys) <= metrics[count_key] <= expected_events, (keys, metrics[count_key])
        before = metrics[count_key]
        stack.sql(f"UPDATE {table} SET qty = -1 WHERE id = 0")
        wait_for(port, lambda m: m.get(key, 0) >= expected_events + 1)
        metrics = scrape(port)
        count = metrics[count_key]
        assert count == before + 1, (before, count)
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in metrics.items()
            if name == "projector_commit_to_visible_seconds_bucket"
            and dict(labels)["table"] == f"public.{table}"
        )
        counts = [value for _, value in buckets]
        assert counts == sorted(counts) and counts[-1] == count, buckets
        elapsed = time.monotonic() - started
        assert 0 < metrics[("projector_commit_to_visible_seconds_sum", visible)] <= count * elapsed
        # The connector's slot, read from Postgres every 15 s.
        slot = (("slot", "projector_slot"),)
        assert metrics[("projector_slot_active", slot)] == 1
        assert metrics[("projector_slot_inactive_seconds", slot)] == 0
        assert metrics[("projector_slot_retained_wal_bytes", slot)] >= 0
        # `projector status` reads the same endpoint while the projector runs.
        status = projector.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["source"].endswith(f":{port}/metrics")
        applied = {(r["table"], r["path"]): r["events"] for r in report["tables"]}
        assert applied[(f"public.{table}", path)] == expected_events + 1
        assert report["dead_letters"] >= 1
        mine = [r for r in report["partitions"] if r["topic"] == topic]
        assert mine == [{"topic": topic, "partition": 0, "lag": 0, "lag_seconds": 0.0}], mine
        line = projection_line(report, f"public.{table}")
        assert (line["kind"], line["state"], line["lag_events"]) == ("replica", "live", 0), line
        assert line["dead_letters"] >= 1 and line["lag_seconds"] == 0.0, line
        table_view = projector.cli("status")
        assert "events applied" in table_view.stdout and table in table_view.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    # Stopped: nothing answers, and status falls back to ClickHouse's checkpoints.
    projector.env["PROJECTOR_WAL_RETAINED_WARNING_BYTES"] = "0"  # any WAL kept is "too much"
    report = json.loads(projector.cli("status", "--json").stdout)
    assert report["source"] == "clickhouse"
    checkpoint = [r for r in report["partitions"] if r["topic"] == topic]
    assert checkpoint and checkpoint[0]["lag"] == 0, checkpoint
    line = projection_line(report, f"public.{table}")
    assert (line["state"], line["lag_events"], line["dead_letters"]) == ("live", 0, 1), line
    assert "2400-01-01" in line["last_error"] or "Date" in line["last_error"], line
    # The source side, read from Postgres and Kafka Connect themselves.
    slot, connector = report["source_side"]["replication_slot"], report["source_side"]["connector"]
    assert slot["state"] == "active" and slot["retained_wal_bytes"] > 0, slot
    assert "retains" in slot["warning"] and not slot["healthy"], slot
    assert connector["state"] == "RUNNING" and connector["tasks"] == ["RUNNING"], connector
    table_view = projector.cli("status").stdout
    assert "WARNING" in table_view and "RUNNING" in table_view, table_view


def projection_line(report: dict, name: str) -> dict:
    found = [row for row in report["projections"] if row["name"] == name]
    assert len(found) == 1, report["projections"]
    return found[0]


def wait_for(port: int, condition: Callable[[dict], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            metrics = scrape(port)
        except httpx.HTTPError:
            metrics = {}
        if condition(metrics):
            return
        assert time.monotonic() < deadline, f"not reached in {timeout_s}s: {metrics}"
        time.sleep(0.5)
