"""`projector rebuild-bench`: how fast `projector rebuild` rebuilds the read models, against
the first build of the same read models in the same run.

On one chDB engine in this process: replicas of `orders` orders (three lines each, plus
customers and products; read_model_bench's generator) straight into replica tables; the read
models built by the projector's backfill (the baseline: what `projector run` does when it meets
the definitions first); then every family rebuilt through `projector rebuild`'s own path (a
request, taken and built by `keep_read_models_here`: backfill, verification against the definition over the
replicas, swap). Reported: seconds, replica rows per second, and rebuild / first build.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devstack.read_model_bench import CONTROL, READ_MODELS, REPLICA, generate_replicas
from projector.clickhouse import ChdbBackend
from projector.operations.requests import REBUILD, OpsRequests
from projector.read_models.definitions import load_definitions
from projector.read_models.maintenance import ReadModelMaintainer
from projector.run.upkeep import keep_read_models_here


def run_rebuild_bench(orders: int, log: Any, report: Path | None, command: str) -> str:
    work = Path(tempfile.mkdtemp(prefix="projector-rebuild-bench-"))
    ch = ChdbBackend(str(work / "chdb"))
    try:
        customers, products = max(1000, orders // 10), max(100, orders // 100)
        log(f"generating replicas: {orders:,} orders, {orders * 3:,} lines ...")
        generate_replicas(ch, orders, customers, products)
        rows = sum(
            int(ch.rows(f"SELECT count() AS n FROM {REPLICA}.{t}")[0]["n"])
            for t in ("orders", "order_items", "customers", "products")
        )
        maintainer = ReadModelMaintainer(
            ch, load_definitions(), "shop", REPLICA, READ_MODELS, CONTROL
        )
        log("first build (the baseline) ...")
        started = time.perf_counter()
        maintainer.family_versions.ensure()
        while maintainer.building:
            maintainer.backfill_step()
        first_s = time.perf_counter() - started
        requests = OpsRequests(ch, CONTROL)
        requests.create()
        families = [f.name for f in maintainer.definitions.families]
        for family in families:
            requests.ask(REBUILD, family)
        log(f"rebuilding {', '.join(families)} through `projector rebuild`'s path ...")
        started = time.perf_counter()
        while requests.pending() or maintainer.building:  # one build per family at a time
            keep_read_models_here(maintainer, requests)
        rebuild_s = time.perf_counter() - started
        states = {
            v["family"]: v["state"]
            for v in maintainer.family_versions.versions()
            if "rebuild" in v["options"]
        }
        assert all(s == "serving" for s in states.values()), states
    finally:
        ch.close()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(
        [
            f"### {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC — rebuild: {orders:,} orders",
            "",
            f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}.",
            "",
            f"Replicas: {rows:,} rows ({orders:,} orders, {orders * 3:,} lines, customers, products). "
            f"First build of the {len(families)} read-model families by the backfill: {first_s:.1f} s "
            f"({rows / first_s:,.0f} replica rows/s). `projector rebuild` of all of them (backfill, "
            f"verification against the definitions, swap): {rebuild_s:.1f} s "
            f"({rows / rebuild_s:,.0f} replica rows/s): rebuild / first build = "
            f"{rebuild_s / first_s:.2f}.",
        ]
    )
    log(text)
    if report is not None:
        with report.open("a") as out:
            out.write("\n" + text + "\n")
    return text
