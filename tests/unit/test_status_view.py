"""`projector status`: one line per projection, built from partitions, dead letters and states,
and drawn so that no two lines look the same however long the names."""

from __future__ import annotations

import io

from rich.console import Console

from projector.cli.status import status_view
from projector.config import ProjectorConfig
from projector.operations.status import projection_rows
from projector.read_models.definitions import load_read_models

CONFIG = ProjectorConfig(read_model_schema="shop")


def partition(topic: str, p: int, lag: int, seconds: float | None = None) -> dict:
    return {"topic": topic, "partition": p, "lag": lag, "lag_seconds": seconds}


def test_replica_lines_sum_partitions_and_read_models_sum_their_sources() -> None:
    rows = projection_rows(
        CONFIG,
        [
            partition("cdc.shop.orders", 0, 3, 1.5),
            partition("cdc.shop.orders", 1, 4, 0.5),
            partition("cdc.shop.order_items", 0, 10, 2.0),
            partition("cdc.transaction", 0, 99),
            partition("cdc.shop.customers", 0, 0),
        ],
        {"shop.orders": {"lsn": "0/10", "age_s": 4.0}, "daily_sales": {"lsn": "0/8"}},
        {"cdc.shop.order_items": (2, "bad value")},
        {"cdc.shop.customers": "topic re-created; rebuild it"},
        {"daily_sales": ("rebuilding 40%", "")},
    )
    by_name = {row["name"]: row for row in rows}
    assert "transaction" not in " ".join(by_name)  # the transaction topic is no projection
    orders = by_name["shop.orders"]
    assert (orders["kind"], orders["state"], orders["lag_events"]) == ("replica", "live", 7)
    assert (orders["lag_seconds"], orders["watermark_lsn"], orders["watermark_age_s"]) == (
        1.5,
        "0/10",
        4.0,
    )
    customers = by_name["shop.customers"]
    assert customers["state"] == "stopped" and "re-created" in customers["last_error"]
    items = by_name["shop.order_items"]
    assert (items["dead_letters"], items["last_error"]) == (2, "bad value")
    models = {m.name: m for m in load_read_models(CONFIG.read_models_file)}
    daily = by_name["daily_sales"]
    fed_by = {f"shop.{s}" for s in models["daily_sales"].sources}
    expected_lag = sum(by_name[t]["lag_events"] for t in fed_by if t in by_name)
    assert expected_lag > 0
    assert (daily["kind"], daily["state"], daily["lag_events"]) == (
        "read model",
        "rebuilding 40%",
        expected_lag,
    )
    assert daily["watermark_lsn"] == "0/8"
    # Every read model has a line; one with no recorded version is not built yet.
    assert {n for n, r in by_name.items() if r["kind"] == "read model"} == set(models)
    assert by_name["monthly_sales"]["state"] == "not built"
    # Where states cannot be known (read from a running projector's metrics): live.
    unknown = projection_rows(CONFIG, [], {}, {}, {}, None)
    assert {row["state"] for row in unknown} == {"live"}


def test_a_paused_table_says_so_unless_it_is_stopped() -> None:
    parts = [partition("cdc.shop.orders", 0, 5), partition("cdc.shop.customers", 0, 0)]
    stopped = {"cdc.shop.customers": "topic re-created"}
    rows = projection_rows(CONFIG, parts, {}, {}, stopped, None, {"shop.orders", "shop.customers"})
    states = {row["name"]: row["state"] for row in rows if row["kind"] == "replica"}
    assert states == {"shop.orders": "paused", "shop.customers": "stopped"}


def test_names_sharing_a_long_prefix_never_look_the_same() -> None:
    prefix = "cdc.public.customers_of_the_northern_region_warehouse_partition_"
    names = [f"{prefix}{suffix}" for suffix in ("4bfdd94c", "4bfdd94d", "a")]
    report = {
        "source": "clickhouse",
        "dead_letters": 0,
        "projections": [
            {
                "name": n,
                "kind": "replica",
                "state": "live",
                "watermark_lsn": None,
                "watermark_age_s": None,
                "lag_events": 0,
                "lag_seconds": None,
                "dead_letters": 0,
                "last_error": "",
            }
            for n in names
        ],
    }
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(status_view(report))
    text = out.getvalue()
    # Folded, never cut: joining each line's first cell gives the names back whole.
    cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    joined = "".join(cells)
    for name in names:
        assert name in joined, text
    assert "…" not in joined
