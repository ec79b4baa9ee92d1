"""Housekeeping between batches never ends the run (projector/run/duties.py)."""

from __future__ import annotations

import logging

import pytest

from projector.errors import StatementRejected
from projector.run.duties import Chore, Chores


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
    chore = Chore("pruning the transaction ledger", prune, every_s=300, first_after_s=300,
                  retry_s=60, clock=clock, failed=counted.append)  # fmt: skip
    chores = Chores([chore])
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

    chores = Chores([Chore("metrics", broken, every_s=1, clock=clock),
                     Chore("watermarks", lambda: done.append(clock.now), every_s=1, clock=clock)])  # fmt: skip
    for _ in range(3):
        clock.now += 1
        chores.run_due()
    assert len(done) == 3
