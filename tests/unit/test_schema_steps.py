"""`SchemaStep.plan`: what one writer schema changes in its replica table (pure: no ClickHouse)."""

from __future__ import annotations

import pytest

from projector.errors import PoisonMessage
from projector.replicas.catalog import ReplicaTable, SchemaStep, SourceColumn, base_type, nullable
from schemas.type_map import column_type
from schemas.upcasters import NO_UPCASTER, Upcaster

INT, LONG = column_type("int"), column_type("long")
OPTIONAL_INT = column_type(["null", "int"])


def replica(**columns: str) -> ReplicaTable:
    return ReplicaTable(
        "replica_public", "t", ["id"], {"id": "Int32", **columns, "_version": "UInt64"}
    )


def plan(
    table: ReplicaTable,
    now: list[SourceColumn],
    before: list[SourceColumn] | None,
    upcaster: Upcaster = NO_UPCASTER,
) -> SchemaStep:
    return SchemaStep.plan("public.t", table, now, upcaster, lambda: before)


def test_the_version_that_retyped_a_column_replaces_it_and_asks_for_a_re_read() -> None:
    step = plan(
        replica(qty="Int32"),
        [SourceColumn("id", INT), SourceColumn("qty", LONG)],
        [SourceColumn("id", INT), SourceColumn("qty", INT)],
    )
    assert [c.name for c in step.retyped] == ["qty"]
    assert "changed type from Int32 to Int64" in step.reread_reason


def test_an_older_version_after_the_retype_changes_nothing() -> None:
    """A replay of an event written before the retype: its value goes into the column as is."""
    step = plan(
        replica(qty="Nullable(Int64)"), [SourceColumn("id", INT), SourceColumn("qty", INT)], None
    )
    assert step == SchemaStep()


def test_a_declared_retype_is_converted_in_place_without_a_re_read() -> None:
    step = plan(
        replica(qty="Int32"),
        [SourceColumn("id", INT), SourceColumn("qty", LONG)],
        [SourceColumn("id", INT), SourceColumn("qty", INT)],
        Upcaster(retypes={"qty": "Int64"}),
    )
    assert [c.name for c in step.converted] == ["qty"] and not step.reread_reason


def test_a_key_column_s_type_change_is_refused() -> None:
    with pytest.raises(PoisonMessage, match="part of the key"):
        plan(replica(), [SourceColumn("id", LONG)], [SourceColumn("id", INT)])


def test_a_column_dropped_by_this_version_goes_nullable_and_nullability_is_no_type_change() -> None:
    step = plan(
        replica(qty="Int32", note="Int32"),
        [SourceColumn("id", INT), SourceColumn("note", OPTIONAL_INT)],
        [SourceColumn("id", INT), SourceColumn("qty", INT), SourceColumn("note", INT)],
    )
    assert step.dropped == ["qty"] and step.widened == ["note"]
    assert not step.retyped and not step.reread_reason


def test_a_dropped_last_column_and_an_added_one_re_read_the_table() -> None:
    step = plan(
        replica(note="Int32", qty="Int32"),
        [SourceColumn("id", INT), SourceColumn("note", INT), SourceColumn("amount", INT)],
        [SourceColumn("id", INT), SourceColumn("note", INT), SourceColumn("qty", INT)],
    )
    assert [c.name for c in step.added] == ["amount"] and step.dropped == ["qty"]
    assert "dropped and another added" in step.reread_reason


@pytest.mark.parametrize(
    ("given", "can_hold_null", "base"),
    [
        ("Int32", "Nullable(Int32)", "Int32"),
        ("Nullable(Int32)", "Nullable(Int32)", "Int32"),
        ("LowCardinality(String)", "LowCardinality(Nullable(String))", "LowCardinality(String)"),
        ("Array(Int32)", "Array(Int32)", "Array(Int32)"),
    ],
)
def test_nullable_and_base_types(given: str, can_hold_null: str, base: str) -> None:
    assert nullable(given) == can_hold_null
    assert base_type(nullable(given)) == base
