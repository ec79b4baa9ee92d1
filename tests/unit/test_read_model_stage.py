"""The read models' stage on the embedded engine (projector/read_models/stage.py): a range
recomputed again after a crash — by this process or the next holder of the lease — writes
exactly what the first attempt would have, whatever the replicas did in between; a standby
never writes; a holder that lost the lease has its next write refused.

Replicas are written straight into their tables (read_model_bench's generator), the replicas'
checkpoints recorded by hand: what a member's batches leave."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devstack.read_model_bench import CONTROL, READ_MODELS, REPLICA, generate_replicas
from projector.clickhouse import ChdbBackend
from projector.commit.checkpoint import DONE, PROJECTION, BatchRange, CheckpointStore
from projector.errors import ClickHouseUnavailable, PartitionLost
from projector.read_models import stage as stage_module
from projector.read_models.definitions import load_definitions
from projector.read_models.maintenance import ReadModelMaintainer
from projector.read_models.stage import ReadModelStage, request_every_key

ORDERS = 300
TOPIC = "cdc.shop.orders"


class Crash(ClickHouseUnavailable):
    """The process dies here (as ClickHouse going away looks to the statement's caller: not
    the definition's fault, so nothing is failed)."""


@pytest.fixture
def ch(tmp_path: Any) -> Iterator[ChdbBackend]:
    ch = ChdbBackend(str(tmp_path / "data"))
    generate_replicas(ch, ORDERS, customers=30, products=10)
    yield ch
    ch.close()


def maintainer_of(ch: Any) -> ReadModelMaintainer:
    return ReadModelMaintainer(ch, load_definitions(), "shop", REPLICA, READ_MODELS, CONTROL)


def built(ch: ChdbBackend) -> ReadModelMaintainer:
    maintainer = maintainer_of(ch)
    maintainer.family_versions.ensure()
    while maintainer.building:
        maintainer.backfill_step()
    return maintainer


def change_order(ch: ChdbBackend, order_id: int, status: str, offset: int) -> None:
    """A new version of an order in its replica, at `offset` of partition 0."""
    ch.execute(
        f"INSERT INTO {REPLICA}.orders (id, customer_id, status, created_at, updated_at, "
        f"_version, _is_deleted, _op, _partition, _offset) SELECT id, customer_id, "
        f"'{status}', created_at, updated_at, {offset}, 0, 'u', 0, {offset} "
        f"FROM {REPLICA}.orders FINAL WHERE id = {order_id}"
    )


def statuses_apart(ch: ChdbBackend, order_id: int) -> tuple[str, str]:
    """Two statuses, each other than the order's now and than each other."""
    ((row,),) = [ch.rows(f"SELECT status FROM {REPLICA}.orders FINAL WHERE id = {order_id}")]
    first, second, *_ = (s for s in ("PENDING", "CONFIRMED", "CANCELLED") if s != row["status"])
    return first, second


def status_in_model(maintainer: ReadModelMaintainer, order_id: int) -> str:
    entity = maintainer.active["order_summary"][0].entity_table
    ((row,),) = [
        maintainer.ch.rows(f"SELECT status FROM {entity} FINAL WHERE order_id = {order_id}")
    ]
    return str(row["status"])


def delete_order(ch: ChdbBackend, order_id: int, offset: int) -> None:
    ch.execute(
        f"INSERT INTO {REPLICA}.orders (id, customer_id, status, created_at, updated_at, "
        f"_version, _is_deleted, _op, _partition, _offset) SELECT id, customer_id, status, "
        f"created_at, updated_at, {offset}, 1, 'd', 0, {offset} "
        f"FROM {REPLICA}.orders FINAL WHERE id = {order_id}"
    )


class CrashingClickHouse:
    """`ch`, dying at the first statement that starts with `before`."""

    def __init__(self, ch: ChdbBackend, before: str) -> None:
        self._ch, self.before = ch, before
        self.topology = ch.topology

    def execute(self, sql: str) -> None:
        if sql.startswith(self.before):
            raise Crash(sql[:80])
        self._ch.execute(sql)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ch, name)


def drift(maintainer: ReadModelMaintainer) -> dict[str, list[dict[str, Any]]]:
    """The models that differ from their definitions, with their rows on one side only."""
    return {m: rows for m, rows in maintainer.family_versions.reconcile().items() if rows}


def test_a_range_replayed_after_the_replicas_moved_on_writes_what_its_deltas_said(
    ch: ChdbBackend,
) -> None:
    maintainer = built(ch)
    assert drift(maintainer) == {}
    first = 10_000_000
    staged, moved = statuses_apart(ch, 5)
    change_order(ch, 5, staged, first)
    change_order(ch, 6, "SHIPPED", first + 1)
    delete_order(ch, 7, first + 2)
    batch = BatchRange(TOPIC, 0, first, first + 2)
    entity = maintainer.active["order_summary"][0].entity_table
    crashing = maintainer_of(CrashingClickHouse(ch, f"INSERT INTO {entity}"))
    crashing.family_versions.ensure()
    with pytest.raises(Crash):  # the deltas are in, the entity rows are not
        crashing.apply_range(batch, "orders", "stage", generation=3)
    # The replicas move on before the replay (another member applies the next batch).
    change_order(ch, 5, moved, first + 3)
    change_order(ch, 6, "DELIVERED", first + 4)
    replayed = maintainer_of(ch)
    replayed.family_versions.ensure()
    replayed.apply_range(batch, "orders", "stage", 3, replay=True)  # from its kept stage
    assert status_in_model(replayed, 5) == staged  # what its deltas said, not the replica now
    replayed.apply_range(BatchRange(TOPIC, 0, first + 3, first + 4), "orders", "stage", 3)
    assert drift(replayed) == {}


def stage_over(ch: Any, member: str, chunk_keys: int = 250_000) -> ReadModelStage:
    replicas = CheckpointStore(ch, CONTROL, PROJECTION)
    replicas.create()
    stage = ReadModelStage(
        ch,
        lambda fenced: ReadModelMaintainer(
            fenced, load_definitions(), "shop", REPLICA, READ_MODELS, CONTROL, chunk_keys
        ),
        replicas,
        CONTROL,
        member,
        may_hold=True,
        table_of=lambda topic: topic.rsplit(".", 1)[1] if topic.startswith("cdc.shop.") else None,
    )
    stage.create()
    return stage


def test_the_next_holder_replays_an_open_range_even_if_it_dies_replaying_it(
    ch: ChdbBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage_module, "LEASE_S", 0.0)  # a holder that stops renewing lapses
    built(ch)
    replicas = CheckpointStore(ch, CONTROL, PROJECTION)
    replicas.create()
    first = 10_000  # past the generator's offsets
    replicas.record(BatchRange(TOPIC, 0, 0, first - 1), DONE)
    holder = stage_over(ch, "elsewhere-1-a")
    assert holder.hold()
    for work in holder.pending():
        holder.step(work)
    assert holder.pending() == []
    staged, moved = statuses_apart(ch, 8)
    change_order(ch, 8, staged, first)
    delete_order(ch, 9, first + 1)
    replicas.record(BatchRange(TOPIC, 0, first, first + 1), DONE)
    (work,) = holder.pending()
    entity = entity_of(holder)
    holder.maintainer.ch = CrashingClickHouse(ch, f"INSERT INTO {entity}")
    with pytest.raises(Crash):
        holder.step(work)
    change_order(ch, 8, moved, first + 2)  # the replicas move on meanwhile
    # The next holder dies too, replaying it (after its deltas again: dropped as duplicates).
    second = stage_over(ch, "elsewhere-2-b")
    second.maintainer.ch = CrashingClickHouse(ch, f"INSERT INTO {entity}")
    with pytest.raises(Crash):
        second.hold()
    third = stage_over(ch, "elsewhere-3-c")
    assert third.hold()  # replays the range from the first holder's scratch
    assert status_in_model(third.maintainer, 8) == staged
    positions = third.positions.load()
    assert positions[(TOPIC, 0)].state == DONE and positions[(TOPIC, 0)].last == first + 1
    replicas.record(BatchRange(TOPIC, 0, first + 2, first + 2), DONE)
    for work in third.pending():
        third.step(work)
    assert drift(third.maintainer) == {}
    # The first holder, back from its stall, is refused before it writes anything.
    with pytest.raises(PartitionLost):
        holder.maintainer.ch = holder.ch
        holder.step(work)
    assert third.positions.load()[(TOPIC, 0)].state == DONE


def entity_of(stage: ReadModelStage) -> str:
    stage.maintainer.family_versions.ensure()
    return stage.maintainer.active["order_summary"][0].entity_table


def test_a_standby_does_not_take_a_live_lease(ch: ChdbBackend) -> None:
    holder, standby = stage_over(ch, "elsewhere-1-a"), stage_over(ch, "elsewhere-2-b")
    assert holder.hold()
    assert not standby.hold()
    assert standby.lease.held is None
    holder.lease.release()  # a clean stop: taken at once
    assert standby.hold()
    assert not holder.hold()


def test_every_key_is_recomputed_after_a_replica_is_replaced(ch: ChdbBackend) -> None:
    """A replica replaced wholesale (a table reset skipped the deletes of some orders; a rebuild
    swapped in a table without them): no range holds those keys, so the stage recomputes every
    key of the read models over the table, chunk by chunk, the read models' own keys too."""
    built(ch)
    replicas = CheckpointStore(ch, CONTROL, PROJECTION)
    replicas.create()
    stage = stage_over(ch, "elsewhere-1-a", chunk_keys=100)  # 300 orders: 3 chunks
    assert stage.hold()
    gone = "id IN (11, 12, 13, 150, 299)"
    ch.execute(f"DELETE FROM {REPLICA}.orders WHERE {gone}")  # not a delete event: no range
    ch.execute(f"DELETE FROM {REPLICA}.order_items WHERE order_id IN (11, 12, 13, 150, 299)")
    assert drift(stage.maintainer) != {}  # the read models still hold them
    request_every_key(ch, CONTROL, TOPIC)
    steps = 0
    while work := stage.pending():
        for range_ in work:
            stage.step(range_)
            steps += 1
    assert steps == 3
    assert drift(stage.maintainer) == {}
