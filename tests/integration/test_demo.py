"""`projector demo` (what `make demo` runs) works end to end: shop, projector, read models."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess


def test_demo_runs_the_shop_and_fills_the_read_models(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)  # its own chDB directory and group
    projector.env.pop("PROJECTOR_TABLE_PATTERN")
    projector.env["PROJECTOR_SCHEMAS"] = "shop"
    # Standard output is a pipe here, as under `make demo | tee` or in CI: no live view can draw,
    # so plain progress lines must come while it runs.
    demo = projector.cli("demo", "--duration", "25", timeout_s=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "demo stopped" in demo.stderr, demo.stderr[-3000:]
    assert "projecting schemas shop" in demo.stderr, demo.stderr[-3000:]
    progress = [line for line in demo.stdout.splitlines() if "events applied" in line]
    assert len(progress) >= 2, demo.stdout[-3000:]  # every few seconds, not once at the end
    last = re.search(
        r"projector: (\d+) events applied.*lag: .*read models \(rows\): (.*)", progress[-1]
    )
    assert last is not None, progress[-1]
    assert int(last.group(1)) > 0 and "orders_by_status" in last.group(2), progress[-1]
    counts = projector.sql(
        f"SELECT sum(orders) AS n FROM {projector.read_model_db}.orders_by_status"
    )
    assert int(counts[0]["n"]) > 0, counts


def test_shop_commands_create_the_tables_and_write_the_story(stack: StackHandle) -> None:
    schema = f"shop_cli_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **stack.env}
    init = subprocess.run(
        [PROJECTOR, "shop", "init", "--schema", schema],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    write = subprocess.run(
        [PROJECTOR, "shop", "write", "--schema", schema, "--rate", "0", "--transactions", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert write.returncode == 0, write.stderr
    assert "60 transactions" in write.stderr, write.stderr
    (orders,) = stack.sql(f"SELECT count(*) FROM {schema}.orders")[0]
    ((identity,),) = stack.sql(
        f"SELECT relreplident FROM pg_class WHERE oid = '{schema}.orders'::regclass"
    )
    assert orders > 0 and identity == "f"  # REPLICA IDENTITY FULL: complete before-images
    bad = subprocess.run(
        [PROJECTOR, "shop", "write", "--rate", "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--rate" in bad.stderr


def test_the_suite_runs_on_a_stack_of_its_own(stack: StackHandle) -> None:
    """What the tests capture (tables, topics, poison messages) stays out of the stack `make
    demo` shows: the suite's stack has a state directory and ports of its own (tests/stack.env)."""
    from devstack.settings import StackSettings

    ours = stack.stack.settings
    assert ours.state_dir.resolve() != (Path.cwd() / ".stack").resolve()
    assert ours.state_dir.name == ".stack-tests"
    defaults = StackSettings.model_fields
    for port in ("postgres_port", "kafka_port", "connect_port", "registry_port"):
        assert getattr(ours, port) != defaults[port].default, port
