"""A read model's `affects` must be computable from what a change carries: a delete carries only
the source's key, an update only its new image. A mapping that reads another column of
`{changed}` would miss the order a deleted line belonged to (or the one a line moved away from),
silently; the family is refused with the reason instead. On the embedded engine, over the shop's
replicas (read_model_bench's generator)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.read_model_bench import CONTROL, READ_MODELS, REPLICA, generate_replicas
from projector.clickhouse import ChdbBackend
from projector.read_models.definitions import load_definitions
from projector.read_models.maintenance import ReadModelMaintainer
from projector.read_models.versions import FAILED

LINES = """
[[entity]]
name = "{name}"
description = "Units per order."
sources = ["orders", "order_items"]
key = ["order_id"]
keys = "SELECT id AS order_id FROM {{orders}}"
sql = \"\"\"
SELECT o.id AS order_id, coalesce(sum(i.quantity), 0) AS units
FROM (SELECT * FROM {{orders}} WHERE id IN {{keys}}) AS o
LEFT JOIN (SELECT * FROM {{order_items}} WHERE order_id IN {{keys}}) AS i ON i.order_id = o.id
GROUP BY o.id
\"\"\"

[entity.affects]
orders = "SELECT id FROM {{changed}}"
order_items = "{order_items}"
"""


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    ch = ChdbBackend(str(tmp_path_factory.mktemp("chdb") / "data"))
    generate_replicas(ch, 50, customers=5, products=5)
    yield ch
    ch.close()


def started(ch: ChdbBackend, definitions: Path | None) -> ReadModelMaintainer:
    maintainer = ReadModelMaintainer(
        ch, load_definitions(definitions), "shop", REPLICA, READ_MODELS, CONTROL
    )
    maintainer.family_versions.ensure()
    return maintainer


def states(maintainer: ReadModelMaintainer) -> dict[str, tuple[str, str]]:
    return {v["family"]: (v["state"], v["error"]) for v in maintainer.family_versions.versions()}


def test_the_shops_mappings_read_only_what_a_change_carries(replicas: ChdbBackend) -> None:
    maintainer = started(replicas, None)
    assert maintainer.active and all(maintainer.active.values())
    assert not [f for f, (state, _) in states(maintainer).items() if state == FAILED]


def test_a_mapping_through_a_column_a_delete_lacks_is_refused(
    replicas: ChdbBackend, tmp_path: Path
) -> None:
    # product_id is not in order_items' key (order_id, line_no): a deleted line's marker has none
    path = tmp_path / "read_models.toml"
    path.write_text(
        LINES.format(
            name="units_by_product_line",
            order_items="SELECT order_id FROM {order_items} "
            "WHERE product_id IN (SELECT product_id FROM {changed})",
        )
    )
    maintainer = started(replicas, path)
    state, error = states(maintainer)["units_by_product_line"]
    assert state == FAILED
    assert "affects of order_items reads a column a delete does not carry" in error
    assert "order_id, line_no" in error and "product_id" in error
    assert maintainer.active["units_by_product_line"] == []  # never kept, never served


def test_a_mapping_through_the_key_is_kept(replicas: ChdbBackend, tmp_path: Path) -> None:
    path = tmp_path / "read_models.toml"
    path.write_text(LINES.format(name="units", order_items="SELECT order_id FROM {changed}"))
    maintainer = started(replicas, path)
    assert states(maintainer)["units"][0] != FAILED
    assert [v.family.name for v in maintainer.active["units"]] == ["units"]


def test_a_new_definition_that_is_incomplete_fails_alone_and_the_serving_one_goes_on(
    replicas: ChdbBackend, tmp_path: Path
) -> None:
    path = tmp_path / "read_models.toml"
    path.write_text(LINES.format(name="units_v", order_items="SELECT order_id FROM {changed}"))
    maintainer = started(replicas, path)
    while maintainer.building:
        maintainer.backfill_step()
    (serving,) = maintainer.active["units_v"]
    path.write_text(  # edited: the new definition maps lines through a non-key column
        LINES.format(
            name="units_v",
            order_items="SELECT order_id FROM {order_items} "
            "WHERE product_id IN (SELECT product_id FROM {changed})",
        )
    )
    maintainer = started(replicas, path)
    versions = {v["version"]: v["state"] for v in maintainer.family_versions.versions()}
    assert versions[serving.version] == "serving", versions
    assert FAILED in versions.values(), versions
    assert [v.version for v in maintainer.active["units_v"]] == [serving.version]
