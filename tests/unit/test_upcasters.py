"""The upcasters file and the rename rule, without services."""

from __future__ import annotations

from pathlib import Path

import pytest

from projector.errors import PoisonMessage
from projector.replicas.catalog import SourceColumn, _undeclared_rename, upcast
from schemas.errors import SchemaError
from schemas.type_map import column_type
from schemas.upcasters import DEFAULT_FILE, Upcaster, Upcasters


def columns(*names: str) -> list[SourceColumn]:
    return [SourceColumn(name, column_type("int")) for name in names]


def test_the_shipped_file_declares_nothing_and_loads() -> None:
    assert DEFAULT_FILE.exists()
    assert Upcasters.load().for_table("public", "anything") == Upcaster()


def test_declarations_are_found_by_table(tmp_path: Path) -> None:
    path = tmp_path / "u.toml"
    path.write_text(
        '[[upcaster]]\ntable = "public.orders"\nrenames = { customer = "customer_id" }\n'
        'retypes = { qty = "Int64" }\n'
    )
    upcaster = Upcasters.load(path).for_table("public", "orders")
    assert upcaster.current_name("customer") == "customer_id"
    assert upcaster.current_name("qty") == "qty"
    renamed = upcast(SourceColumn("customer", column_type("int")), upcaster)
    assert renamed.name == "customer_id" and renamed.ctype.clickhouse == "Int32"
    retyped = upcast(SourceColumn("qty", column_type("int")), upcaster)
    assert retyped.ctype.clickhouse == "Int64" and retyped.ctype.to_clickhouse(5) == 5


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[[upcaster]]\ntable = "orders"\n', "table"),
        ('[[upcaster]]\ntable = "public.t"\n[[upcaster]]\ntable = "public.t"\n', "twice"),
        ('[[upcaster]]\ntable = "public.t"\nrenamed = { a = "b" }\n', "renamed"),
        ("[[upcaster]\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "u.toml"
    path.write_text(text)
    with pytest.raises(SchemaError, match=complaint):
        Upcasters.load(path)


def test_a_missing_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        Upcasters.load(tmp_path / "nope.toml")


def test_a_new_name_at_a_gone_name_s_position_is_a_rename() -> None:
    with pytest.raises(PoisonMessage, match=r"t\.note \(position 2\) looks renamed to remark"):
        _undeclared_rename("public.t", columns("id", "remark", "qty"), columns("id", "note", "qty"))


@pytest.mark.parametrize(
    ("previous", "now"),
    [
        (None, ["id", "a"]),  # the table's first version
        (["id", "a"], ["id", "a", "b"]),  # added at the end
        (["id", "a", "b"], ["id", "b"]),  # dropped
        (["id", "a", "b"], ["id", "b", "c"]),  # dropped one, added one at the end
    ],
)
def test_adds_and_drops_are_not_renames(previous: list[str] | None, now: list[str]) -> None:
    before = None if previous is None else columns(*previous)
    assert _undeclared_rename("public.t", columns(*now), before) is False


def test_a_new_last_column_where_the_last_one_was_is_ambiguous_not_refused() -> None:
    """Renamed, or dropped with another added: the two look the same at the last position."""
    assert _undeclared_rename("public.t", columns("id", "a", "c"), columns("id", "a", "b"))
