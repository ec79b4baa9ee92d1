"""The Prometheus alert rules shipped with the projector (projector/alerts.yml): well formed,
every expression valid PromQL (parsed by promql-parser, the Rust parser Prometheus-compatible
databases use), every metric one the projector serves, and the four alerts operators need."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from projector.metrics import ProjectorMetrics

RULES = Path(__file__).resolve().parents[2] / "projector" / "alerts.yml"


def served_metrics() -> set[str]:
    """Every series name the projector's /metrics can hold."""
    names = set()
    for family in ProjectorMetrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        elif family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        else:
            names.add(family.name)
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_rule_is_well_formed_promql_over_metrics_the_projector_serves() -> None:
    served = served_metrics()
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"] and rule["annotations"]["summary"], rule
        promql_parser.parse(rule["expr"])  # raises on a syntax error
        named = set(re.findall(r"\bprojector_\w+", rule["expr"]))
        assert named and named <= served, (rule["alert"], named - served)
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule


def test_the_alerts_operators_need_are_there() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    slot = by_name["ReplicationSlotInactive"]
    assert "projector_slot_active" in slot["expr"] and slot["for"] == "5m"
    headroom = by_name["ReplicationSlotWalHeadroomLow"]["expr"]
    assert "projector_slot_wal_headroom_ratio" in headroom and "0.2" in headroom
    lag = by_name["CommitToVisibleP99High"]["expr"]
    assert "histogram_quantile(0.99" in lag and "projector_commit_to_visible_seconds_bucket" in lag
    assert "projector_dead_letters_total" in by_name["DeadLettersGrowing"]["expr"]


def test_a_broken_expression_is_caught() -> None:
    """The parser this test relies on refuses what Prometheus would."""
    try:
        promql_parser.parse("sum by (table (rate(projector_dead_letters_total[5m]))")
    except Exception:
        return
    raise AssertionError("promql-parser accepted a broken expression")
