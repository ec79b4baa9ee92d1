"""Work between batches (projector/run/duties.py): the rule every duty keeps, and housekeeping
that never ends the run."""

from __future__ import annotations

import logging

import pytest

from projector.errors import StatementRejected
from projector.run.duties import Chore, Duties


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failing_chore_is_logged_and_tried_again_later(caplog: pytest.LogCaptureFixture) -> None:
    clock, calls = Clock(), []

    def prune() -> None:
        calls.append(clock.now)
        if len(calls) < 3:
            raise StatementRejected("Max query size exceeded: failed at position 262140")

    counted: list[str] = []
    chore = Chore(
        "pruning the transaction ledger",
        prune,
        every_s=300,
        first_after_s=300,
        retry_s=60,
        clock=clock,
        failed=counted.append,
    )
    chores = Duties([chore], clock=clock)
    chores.run_due()
    assert calls == []  # not before its first time
    with caplog.at_level(logging.WARNING, logger="projector"):
        clock.now = 400.0
        chores.run_due()  # fails: no exception reaches the run
        assert calls == [400.0]
        assert "Max query size exceeded" in caplog.text and "the run goes on" in caplog.text
        clock.now = 430.0
        chores.run_due()
        assert calls == [400.0]  # waits for its retry
        clock.now = 460.0
        chores.run_due()  # fails again
        clock.now = 520.0
        chores.run_due()  # succeeds
    assert calls == [400.0, 460.0, 520.0]
    assert chore.failures == 0
    assert counted == ["pruning the transaction ledger"] * 2  # each failure in the metrics
    clock.now = 600.0
    chores.run_due()
    assert len(calls) == 3  # back to its own rhythm: next at 820
    clock.now = 820.0
    chores.run_due()
    assert len(calls) == 4


def test_one_failing_chore_does_not_keep_the_others_from_running() -> None:
    clock, done = Clock(), []

    def broken() -> None:
        raise RuntimeError("a bug")

    chores = Duties(
        [
            Chore("metrics", broken, every_s=1, clock=clock),
            Chore("watermarks", lambda: done.append(clock.now), every_s=1, clock=clock),
        ],
        clock=clock,
    )
    for _ in range(3):
        clock.now += 1
        chores.run_due()
    assert len(done) == 3


class Recorder:
    """A duty that records when it ran, and what the loop's state was then."""

    def __init__(self, name: str, log: list[str], is_due: bool = True) -> None:
        self.name, self.log, self.is_due = name, log, is_due

    def due(self, now: float) -> bool:
        return self.is_due

    def run(self) -> None:
        self.log.append(self.name)


def test_a_duty_runs_only_after_the_batch_in_flight_is_settled() -> None:
    log: list[str] = []
    duties = Duties(
        [
            Recorder("pauses", log),
            Recorder("read models", log, is_due=False),
            Recorder("rebuilds", log),
        ],
        settle=lambda: log.append("settled"),
    )
    duties.run_due()
    assert log == ["settled", "pauses", "rebuilds"]  # once, before the first; in their order


def test_nothing_due_leaves_the_batch_in_flight_alone() -> None:
    log: list[str] = []
    duties = Duties([Recorder("pauses", log, is_due=False)], settle=lambda: log.append("settled"))
    duties.run_due()
    assert log == []  # planning the next batch still overlaps the one applying


def test_no_duty_runs_while_a_replay_is_pending() -> None:
    log: list[str] = []
    pending = [True]
    duties = Duties(
        [Recorder("rebuilds", log)],
        settle=lambda: log.append("settled"),
        replay_pending=lambda: pending[0],
    )
    duties.run_due()
    duties.run_now(lambda: log.append("finish"))
    assert log == ["settled"]  # run_now settles, then sees the replay and does nothing
    pending[0] = False
    duties.run_due()
    assert log == ["settled", "settled", "rebuilds"]


def test_a_replay_opened_while_settling_goes_first() -> None:
    """Settling can re-position a refused batch's partition, which opens a replay."""
    log: list[str] = []
    pending = [False]

    def settle() -> None:
        log.append("settled")
        pending[0] = True

    duties = Duties([Recorder("rebuilds", log)], settle=settle, replay_pending=lambda: pending[0])
    duties.run_due()
    assert log == ["settled"]


def test_a_report_runs_beside_the_batches_in_flight() -> None:
    """A chore that only reads (lag) does not drain the loop's read-ahead; one that changes
    state (pruning), due in the same round, still settles first."""
    clock, log = Clock(), []
    lag = Chore("reporting lag", lambda: log.append("lag"), every_s=1, clock=clock, settles=False)
    prune = Chore(
        "pruning", lambda: log.append("prune"), every_s=300, first_after_s=300, clock=clock
    )
    duties = Duties([lag, prune], settle=lambda: log.append("settled"), clock=clock)
    duties.run_due()
    assert log == ["lag"]  # no settling for a report alone
    clock.now += 300
    duties.run_due()
    assert log == ["lag", "settled", "lag", "prune"]
