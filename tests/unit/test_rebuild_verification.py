"""A read model's rebuild is verified a chunk at a time before it may serve: each step compares
one key chunk of the entity with its definition over the replicas, the last the aggregates with
the entity rows. A wrong row anywhere fails the version, including a key born after the chunk
plan was made, which no backfill chunk covers. On the embedded engine, with replicas written
straight into their tables (read_model_bench's generator)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.read_model_bench import CONTROL, READ_MODELS, REPLICA, generate_replicas
from projector.clickhouse import ChdbBackend
from projector.read_models.definitions import load_definitions
from projector.read_models.maintenance import ReadModelMaintainer
from projector.read_models.versions import FAILED, SERVING

ORDERS = 600


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    ch = ChdbBackend(str(tmp_path_factory.mktemp("chdb") / "data"))
    generate_replicas(ch, ORDERS, customers=60, products=20)
    yield ch
    ch.close()


def rebuilding(ch: ChdbBackend, request: str) -> tuple[ReadModelMaintainer, object]:
    """The shop's read models built, then a rebuild of `order_summary` started (its version
    planned in 4 chunks)."""
    maintainer = ReadModelMaintainer(
        ch, load_definitions(), "shop", REPLICA, READ_MODELS, CONTROL, chunk_keys=ORDERS // 4
    )
    maintainer.family_versions.ensure()
    while maintainer.building:
        maintainer.backfill_step()
    return maintainer, maintainer.family_versions.start_rebuild("order_summary", request)


def step_until(maintainer: ReadModelMaintainer, text: str) -> list[str]:
    lines: list[str] = []
    while maintainer.building:
        line = maintainer.backfill_step() or ""
        lines.append(line)
        if text in line:
            break
    return lines


def state_of(maintainer: ReadModelMaintainer, version: str) -> str:
    return next(
        v["state"] for v in maintainer.family_versions.versions() if v["version"] == version
    )


def test_a_faithful_rebuild_is_verified_chunk_by_chunk_then_serves(replicas: ChdbBackend) -> None:
    maintainer, version = rebuilding(replicas, "clean")
    lines = step_until(maintainer, "now serving")
    chunks = version.chunks  # type: ignore[attr-defined]
    assert chunks >= 4
    verified = [line for line in lines if ": verified " in line]
    assert len(verified) == chunks, lines  # one verification step per key chunk
    assert state_of(maintainer, version.version) == SERVING  # type: ignore[attr-defined]


def test_a_wrong_entity_row_fails_the_version(replicas: ChdbBackend) -> None:
    maintainer, version = rebuilding(replicas, "entity")
    step_until(maintainer, f"{version.chunks}/{version.chunks} chunks")  # type: ignore[attr-defined]
    replicas.execute(  # one order's row in the new version, with a wrong total
        f"INSERT INTO {version.entity_table} SELECT * REPLACE (total + 1 AS total, "  # type: ignore[attr-defined]
        f"_version + 1 AS _version) FROM {version.entity_table} FINAL "  # type: ignore[attr-defined]
        f"WHERE order_id = {ORDERS // 2}"
    )
    lines = step_until(maintainer, "verification failed")
    assert "order_summary differs" in lines[-1], lines
    assert state_of(maintainer, version.version) == FAILED  # type: ignore[attr-defined]


def test_a_key_born_after_the_plan_is_verified_too(replicas: ChdbBackend) -> None:
    """An order above the plan's highest key, in the replicas but (no batch having kept the
    version) not in the new version: the last chunk reaches past the plan's range."""
    maintainer, version = rebuilding(replicas, "newkey")
    step_until(maintainer, f"{version.chunks}/{version.chunks} chunks")  # type: ignore[attr-defined]
    replicas.execute(
        f"INSERT INTO {REPLICA}.orders (id, customer_id, status, created_at, updated_at, "
        "_version, _is_deleted, _op, _partition, _offset) VALUES (10000000, 1, 'PENDING', "
        "'2024-01-01 00:00:00', '2024-01-01 00:00:00', 99999999, 0, 'c', 0, 99999999)"
    )
    try:
        lines = step_until(maintainer, "verification failed")
        assert "order_summary differs" in lines[-1], lines
    finally:
        replicas.execute(f"DELETE FROM {REPLICA}.orders WHERE id = 10000000")


def test_a_wrong_aggregate_row_fails_the_version(replicas: ChdbBackend) -> None:
    maintainer, version = rebuilding(replicas, "aggregate")
    step_until(maintainer, f"verified {version.chunks}/{version.chunks}")  # type: ignore[attr-defined]
    assert maintainer.building  # the entity checks passed; the aggregates' is next
    daily = version.table("daily_sales")  # type: ignore[attr-defined]
    replicas.execute(  # one day's deltas one order richer than the orders say
        f"INSERT INTO {daily} SELECT * FROM {daily} LIMIT 1"
    )
    lines = step_until(maintainer, "verification failed")
    assert "daily_sales differs" in lines[-1], lines
    assert state_of(maintainer, version.version) == FAILED  # type: ignore[attr-defined]


def test_a_wrong_index_row_fails_the_version(replicas: ChdbBackend) -> None:
    maintainer, version = rebuilding(replicas, "index")
    step_until(maintainer, f"verified {version.chunks}/{version.chunks}")  # type: ignore[attr-defined]
    by_customer = version.table("order_summary_by_customer")  # type: ignore[attr-defined]
    replicas.execute(  # a row the model does not have
        f"INSERT INTO {by_customer} SELECT * REPLACE (order_id + 100000000 AS order_id) "
        f"FROM {by_customer} LIMIT 1"
    )
    lines = step_until(maintainer, "verification failed")
    assert "order_summary_by_customer differs" in lines[-1], lines
