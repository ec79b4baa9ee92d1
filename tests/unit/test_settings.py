"""The one rule for settings (projector/config.py): defaults (the local stack's client.env when it
exists), then a TOML file, then the environment; the transaction topic's own batch size; bad
settings are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from projector.config import client_environment, load_config
from projector.errors import ConfigError


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
