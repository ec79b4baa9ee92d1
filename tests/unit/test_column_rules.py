"""Excluded and masked columns as settings (connectors/columns.py): parsed, refused when they
cannot be kept, rendered into Debezium's settings, and the salt never shown."""

from __future__ import annotations

import re

import pytest

from connectors.apply import ConfigChange
from connectors.columns import MASK_KEY_PREFIX, ColumnRules, changed_tables
from connectors.config import render_connector
from connectors.errors import ConnectorConfigError
from projector.redaction import redact

SALT = "s3cret-salt-0123456789"
BASE = {
    "PG_HOST": "h",
    "PG_DATABASE": "d",
    "CDC_USER": "u",
    "CDC_PASSWORD": "p",
    "REGISTRY_URL": "http://r",
}


def test_rules_render_into_debezium_settings_whose_patterns_match_only_their_columns() -> None:
    rules = ColumnRules.from_env(
        {
            "EXCLUDE_COLUMNS": "public.people.ssn, shop.users.tax_id",
            "MASK_COLUMNS": "public.people.email",
            "MASK_SALT": SALT,
        }
    )
    config = render_connector({**BASE, **rules_env(rules)})["config"]
    excluded = config["column.exclude.list"].split(",")
    assert any(re.fullmatch(p, "public.people.ssn") for p in excluded)
    assert any(re.fullmatch(p, "shop.users.tax_id") for p in excluded)
    # an escaped dot: no other column matches by accident
    assert not any(re.fullmatch(p, "public.peopleXssn") for p in excluded)
    masked = config[MASK_KEY_PREFIX + SALT].split(",")
    assert any(re.fullmatch(p, "public.people.email") for p in masked)
    assert rules.excluded_in("public.people") == ("ssn",)
    assert rules.masked_in("public.people") == ("email",)


def rules_env(rules: ColumnRules) -> dict[str, str]:
    return {
        "EXCLUDE_COLUMNS": ",".join(rules.excluded),
        "MASK_COLUMNS": ",".join(rules.masked),
        "MASK_SALT": rules.salt,
    }


def test_no_rules_add_no_setting() -> None:
    config = render_connector(BASE)["config"]
    assert "column.exclude.list" not in config
    assert not any(k.startswith("column.mask") for k in config)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"EXCLUDE_COLUMNS": "public.people"}, "not schema.table.column"),
        ({"MASK_COLUMNS": "a.b.c; DROP", "MASK_SALT": SALT}, "not schema.table.column"),
        ({"MASK_COLUMNS": "a.b.c"}, "MASK_SALT"),
        ({"MASK_COLUMNS": "a.b.c", "MASK_SALT": "short"}, "at least 16"),
        ({"MASK_COLUMNS": "a.b.c", "MASK_SALT": "has space in it x"}, "letters, digits"),
        (
            {"EXCLUDE_COLUMNS": "a.b.c", "MASK_COLUMNS": "a.b.c", "MASK_SALT": SALT},
            "both excluded and masked",
        ),
    ],
)
def test_rules_that_cannot_be_kept_are_refused_with_the_reason(
    env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConnectorConfigError, match=says):
        ColumnRules.from_env(env)


def test_a_changed_rule_names_its_table_only() -> None:
    before = ColumnRules.from_env(
        {"EXCLUDE_COLUMNS": "a.t1.x,a.t2.y", "MASK_COLUMNS": "a.t3.z", "MASK_SALT": SALT}
    )
    current = render_connector({**BASE, **rules_env(before)})["config"]
    assert changed_tables(before, current) == ()
    after = ColumnRules.from_env(
        {"EXCLUDE_COLUMNS": "a.t1.x", "MASK_COLUMNS": "a.t3.z,a.t2.y", "MASK_SALT": SALT}
    )
    assert changed_tables(after, current) == ("a.t2",)
    assert changed_tables(after, None) == ()  # a new connector snapshots everything anyway


def test_the_salt_never_shows_in_a_config_diff_or_a_log_line() -> None:
    rules = ColumnRules.from_env({"MASK_COLUMNS": "a.t.e", "MASK_SALT": SALT})
    config = render_connector({**BASE, **rules_env(rules)})["config"]
    change = ConfigChange.between({}, config)
    assert SALT not in repr(change)
    key = next(k for k in config if k.startswith(MASK_KEY_PREFIX))
    assert SALT not in redact(f"connector config: {key}=a.t.e and MASK_SALT={SALT}")
