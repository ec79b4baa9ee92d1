"""Pure logic of the engine without services: retries and their bounds, batch cutting, the one
rule for settings, and read-model validation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from projector.commit.checkpoint import BatchRange, cut_batch
from projector.config import client_environment, load_config
from projector.errors import ClickHouseUnavailable, ConfigError
from projector.read_models.definitions import ReadModelError, load_definitions, load_read_models
from projector.run import loop as runner
from schemas.errors import RegistryUnavailable

# ---- retries -----------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Each back-off's (low, high) bound; no real sleeping."""
    bounds: list[tuple[float, float]] = []
    monkeypatch.setattr(runner.random, "uniform", lambda lo, hi: bounds.append((lo, hi)) or hi)
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
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
        assert runner.with_retries(action, "applying x", base_s=0.2, cap_s=5.0) == "done"  # type: ignore[arg-type]
    assert [hi for _, hi in sleeps] == [min(5.0, 0.2 * 2**a) for a in range(1, 10)]
    assert all(lo == 0 for lo, _ in sleeps)  # full jitter
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once when it starts, once when it clears
    assert "retrying" in messages[0] and "recovered after 9 retries" in messages[1]


def test_a_message_error_is_not_retried(sleeps: list[tuple[float, float]]) -> None:
    action = failing(1, ValueError("bad value"))
    with pytest.raises(ValueError):
        runner.with_retries(action, "applying x")  # type: ignore[arg-type]
    assert sleeps == [] and action.calls["n"] == 1  # type: ignore[attr-defined]


def test_stopping_bounds_the_retries(sleeps: list[tuple[float, float]]) -> None:
    action = failing(1000, ClickHouseUnavailable("down"))
    with pytest.raises(ClickHouseUnavailable):
        runner.with_retries(action, "applying x", stop=lambda: True)  # type: ignore[arg-type]
    assert action.calls["n"] == 4  # type: ignore[attr-defined]  # gives up after the 4th failure


# ---- batch cutting -----------------------------------------------------------------------------


def cut(
    buffer: list[int], replay: BatchRange | None = None, size: int = 3, drain: bool = False
) -> tuple[list[int], list[int]]:
    batch, rest = cut_batch(buffer, lambda m: m, replay, size, drain)
    return list(batch), list(rest)


def test_a_full_batch_is_cut_and_a_partial_one_waits_unless_draining() -> None:
    assert cut([1, 2, 3, 4]) == ([1, 2, 3], [4])
    assert cut([4]) == ([], [4])
    assert cut([4], drain=True) == ([4], [])
    assert cut([], drain=True) == ([], [])


def test_an_open_intent_is_cut_exactly_again_over_gaps() -> None:
    intent = BatchRange("t", 0, 10, 20)
    assert cut([10, 12], intent, drain=True) == ([], [10, 12])  # not yet at its last offset
    assert cut([10, 12, 20, 21, 22], intent, size=2) == ([10, 12, 20], [21, 22])
    assert cut([10, 15, 21], intent) == ([10, 15], [21])  # offset 20 compacted away


# ---- the one rule for settings ------------------------------------------------------------------


def stack_dir(tmp_path: Path, text: str) -> dict[str, str]:
    (tmp_path / "client.env").write_text(text)
    return {"PROJECTOR_STATE_DIR": str(tmp_path)}


def test_environment_wins_over_the_stack_file_which_wins_over_defaults(tmp_path: Path) -> None:
    env = stack_dir(
        tmp_path, "# the stack\nKAFKA_BOOTSTRAP=127.0.0.1:1111\n\nREGISTRY_URL=http://r\n"
    )
    config = load_config(env=env)
    assert config.kafka_bootstrap == "127.0.0.1:1111"  # the stack over the default
    assert config.registry_url == "http://r"
    config = load_config(env={**env, "KAFKA_BOOTSTRAP": "127.0.0.1:2222"})
    assert config.kafka_bootstrap == "127.0.0.1:2222"  # the environment over the stack
    assert client_environment(env)["REGISTRY_URL"] == "http://r"
    assert load_config(env={"PROJECTOR_STATE_DIR": str(tmp_path / "none")}).kafka_bootstrap == (
        "127.0.0.1:19092"  # no stack: the default
    )


def test_a_toml_file_sits_between_defaults_and_environment(tmp_path: Path) -> None:
    env = {"PROJECTOR_STATE_DIR": str(tmp_path)}
    toml = tmp_path / "projector.toml"
    toml.write_text('group_id = "from-file"\nmax_batch_messages = 7\n')
    assert load_config(toml, env).group_id == "from-file"
    assert load_config(toml, {**env, "PROJECTOR_GROUP_ID": "from-env"}).group_id == "from-env"


def test_the_transaction_topic_may_have_a_batch_size_of_its_own(tmp_path: Path) -> None:
    env = {"PROJECTOR_STATE_DIR": str(tmp_path), "PROJECTOR_MAX_BATCH_MESSAGES": "500"}
    same = load_config(env=env)
    assert same.batch_messages("cdc.transaction") == same.batch_messages("cdc.public.t") == 500
    own = load_config(env={**env, "PROJECTOR_TRANSACTION_BATCH_MESSAGES": "50000"})
    assert own.batch_messages("cdc.transaction") == 50_000
    assert own.batch_messages("cdc.public.t") == 500


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        (None, {}, "does not exist"),
        ("group_id = ", {}, "not valid TOML"),
        ("", {"PROJECTOR_MAX_BATCH_MESSAGES": "0"}, "max_batch_messages"),
        ("", {"PROJECTOR_SCHEMAS": "public,debezium"}, "debezium"),
        ("", {"PROJECTOR_CLICKHOUSE_CLUSTER": "c"}, "needs backend"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(
    tmp_path: Path, content: str | None, env: dict[str, str], message: str
) -> None:
    toml = tmp_path / "projector.toml"
    if content is not None:
        toml.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(toml, {"PROJECTOR_STATE_DIR": str(tmp_path), **env})


# ---- read-model validation ---------------------------------------------------------------------

VALID = """
[[entity]]
name = "m"
description = "d"
sources = ["orders"]
key = ["id"]
keys = "SELECT id FROM {orders}"
sql = "SELECT id, status FROM {orders} WHERE id IN {keys}"
affects = { orders = "SELECT id FROM {changed}" }

[[aggregate]]
name = "a"
description = "d"
entity = "m"
columns = [{ name = "status", group_by = "status" }, { name = "n", sum = "1" }]
"""


INDEX = """
[[index]]
name = "i"
description = "d"
of = "a"
order_by = ["-n", "status"]
"""


def test_an_index_is_a_model_of_its_family_and_changes_its_version(tmp_path: Path) -> None:
    plain = load_definitions(_write(tmp_path, VALID)).families[0]
    indexed = load_definitions(_write(tmp_path, VALID + INDEX))
    family = indexed.families[0]
    assert [i.name for i in family.indexes] == ["i"] and family.indexed(
        family.indexes[0]
    ).name == "a"
    assert family.version != plain.version
    index = next(m for m in indexed.models if m.name == "i")
    assert (index.kind, index.key, index.sources) == ("index", ["status"], ["orders"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (INDEX.replace('"-n", "status"', '"-n"'), "must contain the key of a"),
        (INDEX.replace('of = "a"', 'of = "x"'), "not an \\[\\[entity\\]\\] or"),
        (INDEX.replace('name = "i"', 'name = "a"'), "defined twice"),
    ],
)
def test_bad_indexes_are_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ReadModelError, match=message):
        load_read_models(_write(tmp_path, VALID + text))


def test_the_shipped_definitions_load() -> None:
    names = {m.name for m in load_read_models(None)}
    assert {"order_summary", "daily_sales", "customer_lifetime_value"} <= names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (VALID + VALID, "defined twice"),
        (VALID.replace('sources = ["orders"]', 'sources = ["orders", "items"]'), "affects"),
        (VALID.replace('name = "m"', 'name = "m; DROP"'), "name"),
        (VALID.replace('key = ["id"]\n', ""), "key"),
        (VALID.replace("WHERE id IN {keys}", ""), "keys"),
        (VALID.replace("FROM {orders} WHERE", "FROM {items} WHERE"), "not in sources"),
        (VALID.replace('entity = "m"', 'entity = "x"'), "not an \\[\\[entity\\]\\]"),
        (VALID.replace('sum = "1"', 'sum = "1", latest = "1"'), "exactly one of"),
        (VALID.replace('{ name = "n", sum = "1" }', '{ name = "n", latest = "1" }'), "sum column"),
        ("[[entity]\n", "not valid TOML"),
    ],
)
def test_bad_definitions_are_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "read_models.toml"
    path.write_text(text)
    with pytest.raises(ReadModelError, match=message):
        load_read_models(path)
    assert [m.name for m in load_read_models(_write(tmp_path, VALID))] == ["m", "a"]


def test_a_changed_definition_is_a_new_family_version(tmp_path: Path) -> None:
    before = load_definitions(_write(tmp_path, VALID)).families[0].version
    changed = VALID.replace('sum = "1"', 'sum = "2"')
    assert load_definitions(_write(tmp_path, changed)).families[0].version != before
    assert load_definitions(_write(tmp_path, VALID)).families[0].version == before


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ok.toml"
    path.write_text(text)
    return path
