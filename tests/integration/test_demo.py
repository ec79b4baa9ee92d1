"""`projector demo` (what `make demo` runs) works end to end: shop, projector, read models."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess


def test_demo_runs_the_shop_and_fills_the_read_models(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)  # its own chDB directory and group
    projector.env.pop("PROJECTOR_TABLE_PATTERN")
    projector.env["PROJECTOR_SCHEMAS"] = "shop"
    demo = subprocess.run(
        [PROJECTOR, "demo", "--duration", "25"], env=projector.env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "demo stopped" in demo.stderr and "orders by status" in demo.stderr, demo.stderr[-3000:]
    counts = projector.sql("SELECT sum(orders) AS n FROM read_models.orders_by_status")
    assert int(counts[0]["n"]) > 0, counts
