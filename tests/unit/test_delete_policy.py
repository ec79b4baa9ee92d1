"""The delete policy setting (projector/config.py `parse_policies`): what it takes, what it
refuses, and how a deployment sets it."""

from __future__ import annotations

import pytest

from projector.config import load_config, parse_policies


def test_pairs_from_the_environment_and_a_toml_table() -> None:
    assert parse_policies(" shop.orders=soft, public.prices=history ,") == {
        "shop.orders": "soft",
        "public.prices": "history",
    }
    assert parse_policies({"shop.orders": "hard"}) == {"shop.orders": "hard"}
    assert parse_policies("") == {} and parse_policies(None) == {}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("shop.orders=archive", "one of hard, soft, history"),
        ("shop.orders", "is not schema.table=policy"),
        ("orders=soft", "'orders' is not schema.table"),
        ("shop.orders=soft,shop.orders=hard", "named twice"),
        (["shop.orders"], "expected schema.table=policy pairs"),
    ],
)
def test_what_is_refused_says_why(value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_policies(value)


def test_the_deployment_sets_it_as_delete_policy_or_projector_delete_policy(tmp_path) -> None:
    env = {"PROJECTOR_STATE_DIR": str(tmp_path), "DELETE_POLICY": "shop.orders=soft"}
    assert load_config(env=env).delete_policy == {"shop.orders": "soft"}
    env = {"PROJECTOR_STATE_DIR": str(tmp_path), "PROJECTOR_DELETE_POLICY": "a.b=history"}
    assert load_config(env=env).delete_policy == {"a.b": "history"}
    assert load_config(env={"PROJECTOR_STATE_DIR": str(tmp_path)}).delete_policy == {}
