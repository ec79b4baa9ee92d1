"""Comparing with Postgres in rounds (projector/operations/postgres_rounds.py), and the options a
replica rebuild request carries (a partial re-read's condition among them)."""

from __future__ import annotations

from projector.errors import VerifyError
from projector.operations.postgres_rounds import LAG_TO_VERIFY, ComparisonRounds
from projector.operations.replica_rebuild import parse_options, rebuild_options


class Script:
    """A comparison answering from a list, recording what it was asked to compare."""

    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[list[str] | None] = []

    def __call__(self, keys: list[str] | None) -> tuple[int, list[str]]:
        self.asked.append(keys)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return 100, answer


def test_equal_at_once_settles_with_the_rows_compared() -> None:
    rounds = ComparisonRounds(delays=(0.0,))
    outcome = rounds.round("j", "t", Script([]))
    assert outcome.equal and outcome.rows == 100 and not outcome.failed


def test_no_round_while_the_live_table_is_far_behind() -> None:
    rounds, compare = ComparisonRounds(delays=(0.0,)), Script([])
    rounds.behind("j", LAG_TO_VERIFY + 1)
    assert not rounds.round("j", "t", compare).equal
    assert compare.asked == []  # not even asked
    rounds.behind("j", LAG_TO_VERIFY)
    assert rounds.round("j", "t", compare).equal


def test_differing_keys_are_compared_again_alone_until_they_agree() -> None:
    rounds, compare = ComparisonRounds(delays=(0.0, 0.0)), Script(["k1", "k2"], ["k2"], [])
    first, second, third = (rounds.round("j", "t", compare) for _ in range(3))
    assert not first.equal and not first.failed
    assert not second.equal and not second.failed
    assert third.equal
    assert compare.asked == [None, ["k1", "k2"], ["k2"]]


def test_keys_that_differ_after_the_last_delay_fail_the_job_named() -> None:
    rounds = ComparisonRounds(delays=(0.0, 0.0))
    compare = Script(["k1"], ["k1"], ["k1"])
    outcomes = [rounds.round("j", "t", compare) for _ in range(3)]
    assert [o.failed != "" for o in outcomes] == [False, False, True]
    assert "after 3 comparisons: k1" in outcomes[-1].failed
    # forgotten once settled: a new round starts from the whole again
    assert rounds.round("j", "t", Script([])).equal


def test_a_round_that_cannot_run_is_not_counted() -> None:
    rounds = ComparisonRounds(delays=(0.0,))
    compare = Script(VerifyError("Postgres is down"), ["k1"], VerifyError("again"), [])
    outcomes = [rounds.round("j", "t", compare) for _ in range(4)]
    assert [o.equal for o in outcomes] == [False, False, False, True]
    assert not any(o.failed for o in outcomes)  # one counted round of drift, then equal
    assert compare.asked == [None, None, ["k1"], ["k1"]]


def test_rebuild_options_carry_a_condition_with_commas_whole() -> None:
    where = "id IN (1, 2, 3) AND note <> 'from-kafka, where=x'"
    assert parse_options(rebuild_options("snapshot", where)) == ("snapshot", where)
    assert parse_options(rebuild_options("kafka")) == ("kafka", "")
    assert parse_options("") == ("kafka", "")  # a request from before the options existed
