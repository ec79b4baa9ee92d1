"""A TRUNCATE of a big table is applied inside ClickHouse: the projector's memory stays flat.

The projector's peak RSS while it applies the truncate of 1M rows is compared with its peak in a
run that applies nothing new (same start-up, same consumer): the deletion markers must be made by
ClickHouse, not by pulling every live key into Python (which costs about 1 GB here).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source

ROWS = 1_000_000
# Measured on 2 cores: pulling 2M keys into Python (the code before the fix) grew the peak by
# 3.8 GB, so ~1.9 GB for these 1M; made inside ClickHouse it grows by ~150 MB, the embedded
# engine's own insert and merge buffers (chDB runs in the projector's process), which do not grow
# with the row count.
ALLOWED_GROWTH_KB = 300_000

PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def catch_up_measured(stack: StackHandle, projector: ProjectorProcess) -> int:
    """Catch up to a fence committed now; the highest peak RSS (kB) of the runs it took."""
    fence = stack.fence()
    peak = 0
    deadline = time.monotonic() + 600
    while True:
        with projector.log.open("ab") as log:
            done = subprocess.run(
                [sys.executable, "-c", PEAK_RSS, PROJECTOR, "run", "--until-kafka-end"],
                env=projector.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        assert done.returncode == 0, projector.log.read_text()[-3000:]
        peak = max(peak, int(done.stdout.strip().splitlines()[-1]))
        if projector.fence_applied(fence):
            return peak
        assert time.monotonic() < deadline, f"fence {fence} not applied"
        time.sleep(0.5)


def test_truncate_of_a_million_rows_keeps_memory_flat(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    projector.env["PROJECTOR_MAX_BATCH_MESSAGES"] = "50000"  # load the rows quickly
    table = projector.table("big_trunc")
    stack.sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v text NOT NULL)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g")
    # The fence proves little here: Kafka Connect's producer sends the fence's tiny topic ahead
    # of a million-row backlog on another partition, so catch up until every row is in.
    deadline = time.monotonic() + 600
    while True:
        catch_up_measured(stack, projector)
        count = projector.sql(f"SELECT count() AS n FROM {projector.replica_db}.{table} FINAL")
        if int(count[0]["n"]) == ROWS:
            break
        assert time.monotonic() < deadline, f"{count[0]['n']} of {ROWS} rows applied"

    idle_peak = catch_up_measured(stack, projector)  # nothing new but the fence

    stack.sql(f"TRUNCATE {table}")
    stack.sql(f"INSERT INTO {table} VALUES (7, 'after the truncate')")
    truncate_peak = catch_up_measured(stack, projector)

    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 1
    growth = truncate_peak - idle_peak
    assert growth < ALLOWED_GROWTH_KB, (
        f"peak RSS grew by {growth} kB applying the truncate (idle {idle_peak} kB, "
        f"truncate {truncate_peak} kB)"
    )
