"""Retrying transient failures (`with_retries`, projector/run/loop.py): full-jitter exponential
back-off up to a cap, no retry for an error of the message, and stopping bounds the retries."""

from __future__ import annotations

import logging

import pytest

from projector.errors import ClickHouseUnavailable
from projector.run import retries
from schemas.errors import RegistryUnavailable


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Each back-off's (low, high) bound; no real sleeping."""
    bounds: list[tuple[float, float]] = []
    monkeypatch.setattr(retries.random, "uniform", lambda lo, hi: bounds.append((lo, hi)) or hi)
    monkeypatch.setattr(retries.time, "sleep", lambda _s: None)
    return bounds


def failing(times: int, error: Exception) -> object:
    calls = {"n": 0}

    def action() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return "done"

    action.calls = calls  # type: ignore[attr-defined]
    return action


@pytest.mark.parametrize(
    "error", [ClickHouseUnavailable("down"), RegistryUnavailable("down")], ids=["ch", "registry"]
)
def test_transient_failures_are_retried_with_growing_capped_backoff(
    sleeps: list[tuple[float, float]], error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    action = failing(9, error)
    with caplog.at_level(logging.WARNING, logger="projector"):
        assert retries.with_retries(action, "applying x", base_s=0.2, cap_s=5.0) == "done"  # type: ignore[arg-type]
    assert [hi for _, hi in sleeps] == [min(5.0, 0.2 * 2**a) for a in range(1, 10)]
    assert all(lo == 0 for lo, _ in sleeps)  # full jitter
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once when it starts, once when it clears
    assert "retrying" in messages[0] and "recovered after 9 retries" in messages[1]


def test_a_message_error_is_not_retried(sleeps: list[tuple[float, float]]) -> None:
    action = failing(1, ValueError("bad value"))
    with pytest.raises(ValueError):
        retries.with_retries(action, "applying x")  # type: ignore[arg-type]
    assert sleeps == [] and action.calls["n"] == 1  # type: ignore[attr-defined]


def test_stopping_bounds_the_retries(sleeps: list[tuple[float, float]]) -> None:
    action = failing(1000, ClickHouseUnavailable("down"))
    with pytest.raises(ClickHouseUnavailable):
        retries.with_retries(action, "applying x", stop=lambda: True)  # type: ignore[arg-type]
    assert action.calls["n"] == 4  # type: ignore[attr-defined]  # gives up after the 4th failure
