"""What a replica created from a Postgres definition expects Debezium to send
(projector/replicas/source_tables.py); tests/integration/test_type_roundtrip.py holds the
mapping against Debezium's real schemas for every type of the type map."""

from __future__ import annotations

from projector.replicas.source_tables import PostgresColumn, SourceTable, debezium_type


def column(
    type_name: str, typmod: int = -1, not_null: bool = True, kind: str = "b"
) -> PostgresColumn:
    return PostgresColumn("c", type_name, kind, typmod, not_null)


def test_numeric_precision_and_scale_come_from_the_type_modifier() -> None:
    typmod = ((12 << 16) | 3) + 4  # how Postgres stores numeric(12,3)
    avro = debezium_type(column("numeric", typmod))
    assert avro["connect.parameters"] == {"scale": "3", "connect.decimal.precision": "12"}
    assert (
        debezium_type(column("numeric"))["connect.name"] == "io.debezium.data.VariableScaleDecimal"
    )


def test_timestamps_follow_adaptive_time_microseconds() -> None:
    assert debezium_type(column("timestamp", 3))["connect.name"] == "io.debezium.time.Timestamp"
    assert debezium_type(column("timestamp", 0))["connect.name"] == "io.debezium.time.Timestamp"
    assert (
        debezium_type(column("timestamp", 4))["connect.name"] == "io.debezium.time.MicroTimestamp"
    )
    assert debezium_type(column("timestamp"))["connect.name"] == "io.debezium.time.MicroTimestamp"


def test_a_nullable_column_is_a_union_with_null() -> None:
    assert debezium_type(column("int8", not_null=False)) == ["null", "long"]
    assert debezium_type(column("int8")) == "long"


def test_enums_map_and_unknown_types_make_the_table_wait() -> None:
    assert debezium_type(column("mood", kind="e"))["connect.name"] == "io.debezium.data.Enum"
    assert debezium_type(column("_text")) is None  # an array
    assert debezium_type(column("int4range", kind="r")) is None
    assert debezium_type(column("email", kind="d")) is None  # a domain
    table = SourceTable("public", "t", ["id"], [column("int4"), column("_int4")])
    assert table.replica_columns() is None
    table = SourceTable("public", "t", ["id"], [column("int4"), column("text", not_null=False)])
    assert [c.ctype.clickhouse for c in table.replica_columns() or []] == [
        "Int32",
        "Nullable(String)",
    ]
