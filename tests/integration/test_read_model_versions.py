"""A changed read-model definition is built beside the serving version, from the replicas,
between batches; a crash in the middle of its backfill resumes; when complete it serves, and
the old version's tables are gone.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from devstack.shop import ShopWriter
from projector.read_models.definitions import DEFINITIONS_FILE
from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess
from tests.integration.read_model_checks import (
    assert_equal_to_postgres,
    comparable,
    shop_projection,
)

DAILY_UNITS = """
    SELECT (o.created_at AT TIME ZONE 'UTC')::date::text, sum(i.quantity)
    FROM {s}.orders o JOIN {s}.order_items i ON i.order_id = o.id
    WHERE o.status <> 'CANCELLED' GROUP BY 1 ORDER BY 1"""


def versions(projector: ProjectorProcess) -> dict[str, list[dict[str, object]]]:
    listed = projector.cli("read-models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    found: dict[str, list[dict[str, object]]] = {}
    for row in json.loads(listed.stdout):
        found.setdefault(row["family"], []).append(row)
    return found


@one_backend("chdb")
def test_a_changed_definition_builds_beside_the_serving_one_and_resumes_after_a_crash(
    stack: StackHandle, projector: ProjectorProcess, tmp_path: Path
) -> None:
    schema = shop_projection(stack, projector)
    projector.env |= {
        "PROJECTOR_READ_MODEL_BACKFILL_CHUNK_KEYS": "5",  # many chunks: a crash lands inside
    }
    writer = ShopWriter(stack.admin_dsn, schema, seed=3)
    writer.run(rate_per_s=0, transactions=300)
    projector.catch_up()
    before = versions(projector)
    assert all(len(v) == 1 and v[0]["state"] == "serving" for v in before.values()), before
    old = before["order_summary"][0]["version"]

    # daily_sales gains a column: its family (order_summary and what it feeds) is a new version
    changed = tmp_path / "read_models.toml"
    changed.write_text(
        DEFINITIONS_FILE.read_text().replace(
            '  { name = "revenue", sum = "total" },\n  { name = "average_order_value"',
            '  { name = "revenue", sum = "total" },\n  { name = "units", sum = "units" },\n'
            '  { name = "average_order_value"',
            1,
        )
    )
    assert changed.read_text() != DEFINITIONS_FILE.read_text()
    projector.env["PROJECTOR_READ_MODELS_FILE"] = str(changed)
    seen = len(projector.log.read_bytes())
    process = projector.start()
    writer.run(rate_per_s=0, transactions=100)  # changes while it builds
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # some chunks done, not all: a crash inside the backfill
        if re.search(rb"order_summary version \w+: [2-9]/", projector.log.read_bytes()[seen:]):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    building = versions(projector)["order_summary"]
    assert {v["state"] for v in building} == {"serving", "building"}, building
    projector.catch_up()  # resumes the backfill, then serves the new version

    after = versions(projector)
    assert [v["state"] for v in after["order_summary"]] == ["serving"], after
    assert after["order_summary"][0]["version"] != old
    assert after["order_lines"] == before["order_lines"]  # untouched families keep their version
    leftovers = projector.sql(
        f"SELECT name FROM system.tables WHERE database = '{projector.read_model_db}' "
        f"AND endsWith(name, '__{old}')"
    )
    assert leftovers == [], leftovers
    daily = projector.sql(
        f"SELECT toString(day) AS day, units FROM {projector.read_model_db}.daily_sales ORDER BY day"
    )
    expected = [
        tuple(comparable(v) for v in row) for row in stack.sql(DAILY_UNITS.format(s=schema))
    ]
    assert [tuple(comparable(v) for v in r.values()) for r in daily] == expected
    reconcile = projector.cli("read-models", "reconcile")
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    # the other models still equal Postgres (daily_sales has a column more: compared above)
    assert_equal_to_postgres(stack, projector, schema, skip=frozenset({"daily_sales"}))
