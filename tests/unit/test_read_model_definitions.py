"""Read-model definitions (projector/read_models/definitions.py): the shipped file loads, bad
definitions and indexes are refused naming the problem, and a change is a new family version."""

from __future__ import annotations

from pathlib import Path

import pytest

from projector.read_models.definitions import ReadModelError, load_definitions, load_read_models

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
