"""The finish line of `projector run --until-...` (projector/commit/finish_line.py), against a fake of what
Kafka, the checkpoints and the transaction ledger say."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from projector.commit.finish_line import Finish, FinishLine, partitions_behind, source_position
from projector.commit.transactions import Unfinished, lsn_text, parse_lsn
from projector.config import connector_source_dsn, load_config
from projector.errors import ConfigError

TX = ("cdc.transaction", 0)
ORDERS = ("cdc.public.orders", 0)


@dataclass
class FakeProgress:
    """Kafka whose ends move on at every read (heartbeats), a ledger with ENDs at given LSNs."""

    ends: dict[tuple[str, int], int] = field(default_factory=lambda: {TX: 10, ORDERS: 100})
    applied: dict[tuple[str, int], int | None] = field(default_factory=dict)
    # (transaction-topic offset, LSN) of every recorded END
    recorded_ends: list[tuple[int, int]] = field(default_factory=list)
    gap: Unfinished | None = None
    end_reads: int = 0

    def end_offsets(self) -> dict[tuple[str, int], int]:
        self.end_reads += 1
        ends = dict(self.ends)
        self.ends[TX] += 2  # a heartbeat transaction (BEGIN, END) after every read
        return ends

    def applied_to(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        return {p: self.applied.get(p) for p in partitions}

    def fence_offset(self, lsn: int) -> int | None:
        return min(
            (offset for offset, end_lsn in self.recorded_ends if end_lsn >= lsn), default=None
        )

    def unfinished(self, fence_offset: int) -> Unfinished | None:
        return self.gap


def test_kafka_end_is_read_once_and_reached_though_the_ends_move_on() -> None:
    progress = FakeProgress()
    line = FinishLine(Finish(kafka_end=True), progress)
    progress.applied = {TX: 10, ORDERS: 99}
    assert not line.reached()
    assert "cdc.public.orders[0] at 99 of 100" in line.waiting_for
    progress.applied = {TX: 10, ORDERS: 100}  # applied to the line, not to the moving end
    assert line.reached()
    assert progress.end_reads == 1  # once, when the run was asked to finish


def test_lsn_line_waits_for_the_fence_then_reads_kafka_once() -> None:
    progress = FakeProgress(recorded_ends=[(1, 500), (3, 900)])
    line = FinishLine(Finish(lsn=1000), progress)
    assert progress.end_reads == 0  # an LSN line reads Kafka only once the fence is there
    progress.applied = {TX: 10, ORDERS: 100}
    assert not line.reached()  # no END at or after LSN 1000 recorded yet
    assert lsn_text(1000) in line.waiting_for
    progress.recorded_ends.append((5, 1000))  # a transaction ending exactly at the target
    progress.applied = {TX: 6, ORDERS: 100}
    assert not line.reached()  # the fence is there; Kafka's end then is 10 on the topic
    assert line.fence == 5 and progress.end_reads == 1
    progress.applied = {TX: 10, ORDERS: 100}
    assert line.reached()
    assert progress.end_reads == 1


def test_lsn_line_waits_for_transactions_the_fence_has_seen_end() -> None:
    progress = FakeProgress(recorded_ends=[(1, 2000)], applied={TX: 10, ORDERS: 100})
    progress.gap = Unfinished(1, "771", "public.orders", expected=5, settled=3)
    line = FinishLine(Finish(lsn=1000), progress)
    assert not line.reached()  # Kafka's partitions are applied, a transaction is not complete
    assert "transaction 771 on public.orders: 3 of 5" in line.waiting_for
    progress.gap = None
    assert line.reached()


def test_a_partition_nobody_applied_is_behind() -> None:
    behind = partitions_behind({TX: 4, ORDERS: 7}, {TX: 4, ORDERS: None})
    assert [(b.topic, b.applied_to, b.end) for b in behind] == [("cdc.public.orders", None, 7)]
    assert partitions_behind({TX: 4}, {TX: 5}) == []


def test_finish_is_one_line() -> None:
    with pytest.raises(ValueError):
        Finish()
    with pytest.raises(ValueError):
        Finish(lsn=5, kafka_end=True)


@pytest.mark.parametrize(
    ("text", "lsn"),
    [("0/16B3748", 0x16B3748), ("1/0", 1 << 32), ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1)],
)
def test_lsn_text_round_trips(text: str, lsn: int) -> None:
    assert parse_lsn(text) == lsn
    assert lsn_text(lsn) == text


@pytest.mark.parametrize("text", ["16B3748", "0/", "0/16B3748/1", "x/1", "123456789/0", ""])
def test_what_is_not_an_lsn_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match="0/16B3748"):
        parse_lsn(text)


def test_source_database_comes_from_the_connectors_environment() -> None:
    env = {"PG_HOST": "db", "PG_DATABASE": "app", "CDC_USER": "cdc", "CDC_PASSWORD": "p@ss/word"}
    assert connector_source_dsn(env) == "postgresql://cdc:p%40ss%2Fword@db:5432/app"
    assert connector_source_dsn({"ADMIN_DSN": "postgresql://admin@db/app"}) == (
        "postgresql://admin@db/app"
    )
    assert connector_source_dsn({}) is None


def test_configured_source_dsn_wins_and_none_is_a_clear_error(tmp_path: object) -> None:
    no_stack = {"PROJECTOR_STATE_DIR": str(tmp_path)}  # no .stack/client.env there
    assert load_config(env=no_stack).source_dsn is None
    mine = "postgresql://reader@db/app"
    env = {
        **no_stack,
        "PROJECTOR_SOURCE_DSN": mine,
        "PG_HOST": "other",
        "PG_DATABASE": "app",
        "CDC_USER": "cdc",
    }
    assert load_config(env=env).source_dsn == mine
    with pytest.raises(ConfigError, match="PROJECTOR_SOURCE_DSN"):
        source_position(None)
