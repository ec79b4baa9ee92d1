"""What `make bench` prints against the throughput issue's targets (devstack/bench.py,
devstack/freshness.py): the ratios come from the same run's figures, and a run above Debezium's
ceiling is never reported as its sustained ceiling."""

from __future__ import annotations

from devstack.bench import Result, render_report
from devstack.freshness import RunResult, _ceiling_note, render


def test_the_live_path_is_reported_against_the_ceiling_and_the_rebuild_of_the_same_run() -> None:
    results = [
        Result("(a) projector, fast path", 10_000_000, 50.0, 900),  # 200,000 events/s
        Result("(e) projector rebuild --from kafka", 10_000_000, 40.0, 900),  # 250,000
        Result("(d) C++ ceiling", 10_000_000, 16.0, 2_000),  # 625,000
    ]
    report = render_report(results, 10_000_000, 4_000_000)
    assert "(a)/(d) = 0.32 (target ≥ 0.35 at 10M events)" in report
    assert "(a)/(e) = 0.80 (target ≥ 1)" in report
    without_rebuild = render_report([results[0], results[2]], 10_000_000, 4_000_000)
    assert "(a)/(d) = 0.32" in without_rebuild and "(a)/(e)" not in without_rebuild


def test_freshness_names_the_sustained_ceiling_and_the_runs_above_it() -> None:
    assert _ceiling_note("t-ceiling1", sustained="t-ceiling1") == " (Debezium's sustained ceiling)"
    assert "fell behind" in _ceiling_note("t-ceiling0", sustained="t-ceiling1")
    assert "fell behind" in _ceiling_note("t-ceiling0", sustained="")  # none kept up
    assert _ceiling_note("t-1000", sustained="t-ceiling1") == ""


def test_freshness_reports_the_read_model_beside_the_replica() -> None:
    row = RunResult("1,000 writes/s", 1000, 999.0, 20_000, 100, 150, 210, 300, 120, 260, 40, 90)
    report = render([row], 20, 30_000, 32_000, 50_000, (100, 0.05))
    header = next(line for line in report.splitlines() if line.startswith("| writer"))
    assert "replica p50 ms" in header and "read model p50 / p99 ms" in header
    assert (
        "| 1,000 writes/s | 999 | 20,000 | 100 | 150 | 210 | 300 | 120 / 260 | 40 / 90 |" in report
    )
