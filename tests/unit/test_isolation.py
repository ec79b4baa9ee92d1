"""Data never stops the projector: an unexpected failure while applying is narrowed down to the
messages at fault (dead-lettered with the error), while infrastructure failures are raised for
the runner to retry. The per-message path is replaced by a fake here; the real one runs in
tests/integration/test_dead_letters.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from projector.commit.checkpoint import BatchRange
from projector.commit.dead_letters import DeadLetter
from projector.errors import CheckpointError, ClickHouseUnavailable, not_the_message
from projector.messages import RawMessage
from projector.replicas.apply import BatchApplier
from projector.replicas.events import BatchOutcome
from schemas.errors import RegistryUnavailable

BATCH = BatchRange("cdc.public.t", 0, 100, 131)
MESSAGES = [RawMessage(BATCH.topic, 0, offset, b"k", b"v") for offset in range(100, 132)]


class FakeApply:
    """The per-message path: fails when the messages include a poison offset, else applies
    them; records every call's offsets and chunk prefix."""

    def __init__(self, poison: set[int], error: Exception) -> None:
        self.poison, self.error = poison, error
        self.calls: list[tuple[int, int, str]] = []
        self.applied: list[int] = []

    def __call__(
        self, batch: BatchRange, messages: Sequence[RawMessage], chunk: str = ""
    ) -> BatchOutcome:
        self.calls.append((messages[0].offset, messages[-1].offset, chunk))
        if any(m.offset in self.poison for m in messages):
            raise self.error
        self.applied += [m.offset for m in messages]
        return BatchOutcome(len(messages), [])


def applier_with(fake: FakeApply) -> BatchApplier:
    applier = BatchApplier(ch=None, schemas=None, catalog=None)  # type: ignore[arg-type]
    applier._apply_per_message = fake  # type: ignore[method-assign]
    return applier


def apply(applier: BatchApplier) -> tuple[BatchOutcome, list[DeadLetter]]:
    letters: list[DeadLetter] = []
    outcome = applier.apply(BATCH, MESSAGES, lambda _batch, dead: letters.extend(dead))
    return outcome, letters


def test_unexpected_errors_dead_letter_exactly_the_messages_at_fault() -> None:
    fake = FakeApply({107, 120, 121}, UnicodeDecodeError("utf-8", b"\x90", 0, 1, "invalid"))
    outcome, letters = apply(applier_with(fake))

    assert sorted(letter.offset for letter in letters) == [107, 120, 121]
    assert {letter.stage for letter in letters} == {"apply"}
    assert all(letter.error.startswith("UnicodeDecodeError:") for letter in letters)
    assert sorted(fake.applied) == [o for o in range(100, 132) if o not in (107, 120, 121)]
    assert outcome.applied == 32 - 3 and outcome.dead == letters
    # Halves only: far fewer attempts than one per message.
    assert len(fake.calls) < 32


def test_isolation_is_the_same_on_every_attempt() -> None:
    """A replay cuts the same parts with the same chunk names, so its inserts deduplicate."""
    runs = []
    for _ in range(2):
        fake = FakeApply({113}, KeyError("after"))
        apply(applier_with(fake))
        runs.append(fake.calls)
    assert runs[0] == runs[1]
    chunks = [chunk for _, _, chunk in runs[0]]
    assert chunks[0] == "" and len(set(chunks)) == len(chunks)  # every part its own tokens
    assert all(chunk == f"s{first}-{last}." for first, last, chunk in runs[0][1:])


NOT_ENOUGH_SPACE = RuntimeError(
    "Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)"
)


@pytest.mark.parametrize(
    ("error", "raised_as"),
    [
        (ClickHouseUnavailable("server down"), ClickHouseUnavailable),
        (RegistryUnavailable("registry down"), RegistryUnavailable),
        (CheckpointError("overlap"), CheckpointError),  # a broken invariant stops the projector
        (NOT_ENOUGH_SPACE, ClickHouseUnavailable),  # chDB's error: retried by the runner
        (OSError(28, "No space left on device"), ClickHouseUnavailable),
    ],
)
def test_infrastructure_errors_are_raised_never_dead_lettered(
    error: Exception, raised_as: type[Exception]
) -> None:
    fake = FakeApply({110}, error)
    with pytest.raises(raised_as):
        apply(applier_with(fake))
    assert len(fake.calls) == 1  # no isolation: the batch is retried (or stops) whole


def test_clickhouse_data_errors_may_be_the_messages() -> None:
    rejected: Any = RuntimeError(
        "Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'x': "
        "(at row 1): While executing ParallelParsingBlockInputFormat. (CANNOT_PARSE_INPUT_ASSERTION_FAILED)"
    )
    assert not_the_message(rejected) is None
    fake = FakeApply({131}, rejected)
    _, letters = apply(applier_with(fake))
    assert [letter.offset for letter in letters] == [131]
    assert "CANNOT_PARSE_INPUT" in letters[0].error
