"""The type map, checked against a real ClickHouse (chDB).

Each case builds the Avro field type as Debezium + Confluent's AvroConverter registers it, encodes
Debezium's datum with fastavro and decodes it as the projector does (`parse_schema` +
`schemaless_reader`), converts it with `column_type(...).to_clickhouse`, inserts it with
JSONEachRow into a chDB table of that column type and reads it back. Expected values are written
by hand from Postgres semantics.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from chdb import session as chdb_session

from schemas.errors import SchemaError
from schemas.type_map import UnconvertibleValue, UnsupportedType, column_type

DB = "type_map"
READ_SETTINGS = (
    "output_format_decimal_trailing_zeros = 1, output_format_json_quote_decimals = 1, "
    "output_format_json_quote_denormals = 1, output_format_json_quote_64bit_integers = 0"
)


# --- Avro field types as Debezium registers them ------------------------------------------


def semantic(avro: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": avro, "connect.version": 1, "connect.name": name, **extra}


def decimal(precision: int | None, scale: int) -> dict[str, Any]:
    params = {"scale": str(scale)}
    if precision is not None:
        params["connect.decimal.precision"] = str(precision)
    return {
        "type": "bytes",
        "scale": scale,
        "precision": 64 if precision is None else precision,  # Confluent's default
        "connect.version": 1,
        "connect.parameters": params,
        "connect.name": "org.apache.kafka.connect.data.Decimal",
        "logicalType": "decimal",
    }


VARIABLE_SCALE_DECIMAL = {
    "type": "record",
    "name": "VariableScaleDecimal",
    "namespace": "io.debezium.data",
    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
    "connect.doc": "Variable scaled decimal",
    "connect.version": 1,
    "connect.name": "io.debezium.data.VariableScaleDecimal",
}
ENUM = semantic(
    "string", "io.debezium.data.Enum", **{"connect.parameters": {"allowed": "red,green"}}
)


def nullable(avro: Any) -> list[Any]:
    return ["null", avro]


def array(items: Any) -> dict[str, Any]:
    return {"type": "array", "items": items}


def vsd(unscaled: int, scale: int) -> dict[str, Any]:
    """Debezium's VariableScaleDecimal datum: BigInteger.toByteArray() of the unscaled value."""
    return {
        "scale": scale,
        "value": unscaled.to_bytes(unscaled.bit_length() // 8 + 1, "big", signed=True),
    }


# --- the table of cases -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    avro: Any
    clickhouse: str
    values: list[tuple[Any, Any]]  # (Debezium datum, expected value read back as JSON)
    read: str = "v"  # expression read back (hex for bytes)


ALL_BYTES = bytes(range(256))
ALL_BYTES_HEX = "".join(f"{b:02X}" for b in range(256))
BIG_76 = (
    "123456789012345678901234567890123456789012345678901234567890123456.1234567800"  # 76 digits
)

CASES = [
    Case(
        "smallint",
        {"type": "int", "connect.type": "int16"},
        "Int16",
        [(-32768, -32768), (32767, 32767)],
    ),
    Case("integer", "int", "Int32", [(-2147483648, -2147483648), (2147483647, 2147483647)]),
    Case(
        "bigint",
        "long",
        "Int64",
        [(-9223372036854775808, -9223372036854775808), (9223372036854775807, 9223372036854775807)],
    ),
    Case(
        "real",
        "float",
        "Float32",
        [
            (0.1, 0.1),  # Postgres real '0.1'; fastavro hands over 0.10000000149011612
            (3.4028235e38, 3.4028235e38),
            (float("nan"), "nan"),
            (float("inf"), "inf"),
            (float("-inf"), "-inf"),
        ],
    ),
    Case(
        "double",
        "double",
        "Float64",
        [
            (0.1, 0.1),
            (5e-324, 5e-324),
            (1.7976931348623157e308, 1.7976931348623157e308),
            (float("nan"), "nan"),
            (float("inf"), "inf"),
            (float("-inf"), "-inf"),
        ],
    ),
    Case("boolean", "boolean", "Bool", [(True, True), (False, False)]),
    Case(
        "text",
        "string",
        "String",
        [("héllo wörld", "héllo wörld"), ('😀 "q" \\ \t\n', '😀 "q" \\ \t\n'), ("", "")],
    ),
    Case("varchar null", nullable("string"), "Nullable(String)", [(None, None), ("x", "x")]),
    Case("inet", "string", "String", [("192.168.0.1/24", "192.168.0.1/24")]),
    Case(
        "bytea",
        "bytes",
        "String",
        [(b"\x00\xff\x80abc\n", "00FF806162630A"), (b"", ""), (ALL_BYTES, ALL_BYTES_HEX)],
        read="hex(v)",
    ),
    Case(
        "bytea null",
        nullable("bytes"),
        "Nullable(String)",
        [(None, None), (b"\x00", "00")],
        read="hex(v)",
    ),
    Case(
        "bytea[] with nulls",
        array(nullable("bytes")),
        "Array(Nullable(String))",
        [([b"\x00", None, b"\xff"], ["00", None, "FF"]), ([], [])],
        read="arrayMap(x -> hex(x), v)",
    ),
    Case(
        "numeric(10,2)",
        decimal(10, 2),
        "Decimal(10, 2)",
        [
            (Decimal("12.30"), "12.30"),
            (Decimal("-0.01"), "-0.01"),
            (Decimal("0.00"), "0.00"),
            (Decimal("-99999999.99"), "-99999999.99"),
        ],
    ),
    Case(
        "numeric(38,0)",
        decimal(38, 0),
        "Decimal(38, 0)",
        [(Decimal("9" * 38), "9" * 38), (Decimal("-" + "9" * 38), "-" + "9" * 38)],
    ),
    Case(
        "numeric(76,10)",
        decimal(76, 10),
        "Decimal(76, 10)",
        [(Decimal(BIG_76), BIG_76), (Decimal("-" + BIG_76), "-" + BIG_76)],
    ),
    Case(
        "numeric(100,2)",
        decimal(100, 2),
        "String",
        [(Decimal("9" * 98 + ".05"), "9" * 98 + ".05"), (Decimal("-1.10"), "-1.10")],
    ),
    Case(
        "money",
        decimal(None, 2),
        "Decimal(38, 2)",
        [(Decimal("-92233720368547758.08"), "-92233720368547758.08"), (Decimal("1.50"), "1.50")],
    ),
    Case(
        "numeric",
        nullable(VARIABLE_SCALE_DECIMAL),
        "Nullable(String)",
        [
            (vsd(-1234500, 4), "-123.4500"),
            (vsd(0, 0), "0"),
            (vsd(0, 3), "0.000"),
            (vsd(-5, 3), "-0.005"),
            (vsd(-128, 0), "-128"),
            (vsd(10**50 + 1, 20), "1" + "0" * 30 + "." + "0" * 19 + "1"),
            (None, None),
        ],
    ),
    Case(
        "date",
        semantic("int", "io.debezium.time.Date"),
        "Date32",
        [
            (0, "1970-01-01"),
            (-1, "1969-12-31"),
            (-25567, "1900-01-01"),
            (19782, "2024-02-29"),
            (120529, "2299-12-31"),
        ],
    ),
    Case(
        "timestamp(6)",
        nullable(semantic("long", "io.debezium.time.MicroTimestamp")),
        "Nullable(DateTime64(6, 'UTC'))",
        [
            (1704164645123456, "2024-01-02 03:04:05.123456"),
            (-1, "1969-12-31 23:59:59.999999"),
            (-2208988800000000, "1900-01-01 00:00:00.000000"),
            (None, None),
        ],
    ),
    Case(
        "timestamp(3)",
        semantic("long", "io.debezium.time.Timestamp"),
        "DateTime64(6, 'UTC')",
        [(1704164645123, "2024-01-02 03:04:05.123000"), (-1, "1969-12-31 23:59:59.999000")],
    ),
    Case(
        "nano timestamp",
        semantic("long", "io.debezium.time.NanoTimestamp"),
        "DateTime64(9, 'UTC')",
        [
            (1704164645123456789, "2024-01-02 03:04:05.123456789"),
            (-1, "1969-12-31 23:59:59.999999999"),
        ],
    ),
    Case(
        "timestamptz",
        semantic("string", "io.debezium.time.ZonedTimestamp"),
        "DateTime64(6, 'UTC')",
        [
            ("2024-01-02T03:04:05.123456Z", "2024-01-02 03:04:05.123456"),
            ("1969-07-20T20:17:40Z", "1969-07-20 20:17:40.000000"),
            ("2024-01-02T05:04:05.5+02:00", "2024-01-02 03:04:05.500000"),
        ],
    ),
    Case(
        "time",
        semantic("long", "io.debezium.time.MicroTime"),
        "String",
        [
            (0, "00:00:00"),
            (45296500000, "12:34:56.5"),
            (1, "00:00:00.000001"),
            (86399999999, "23:59:59.999999"),
            (86400000000, "24:00:00"),
        ],
    ),
    Case(
        "timetz",
        semantic("string", "io.debezium.time.ZonedTime"),
        "String",
        [("03:04:05.123Z", "03:04:05.123Z")],
    ),
    Case(
        "interval",
        semantic("string", "io.debezium.time.Interval"),
        "String",
        [("P1Y2M3DT4H5M6.78S", "P1Y2M3DT4H5M6.78S")],
    ),
    Case(
        "uuid",
        semantic("string", "io.debezium.data.Uuid"),
        "UUID",
        [("0e3c0f3a-8b0b-4d7a-9f3a-1234567890ab", "0e3c0f3a-8b0b-4d7a-9f3a-1234567890ab")],
    ),
    Case(
        "jsonb",
        semantic("string", "io.debezium.data.Json"),
        "String",
        [('{"a": [1, 2.50, null]}', '{"a": [1, 2.50, null]}')],
    ),
    Case("xml", semantic("string", "io.debezium.data.Xml"), "String", [("<a>ü</a>", "<a>ü</a>")]),
    Case("enum", ENUM, "LowCardinality(String)", [("red", "red")]),
    Case(
        "enum null",
        nullable(ENUM),
        "LowCardinality(Nullable(String))",
        [("green", "green"), (None, None)],
    ),
    Case(
        "int[] with nulls",
        array(nullable("int")),
        "Array(Nullable(Int32))",
        [([1, None, 3], [1, None, 3]), ([], [])],
    ),
    Case(
        "text[] null",
        nullable(array("string")),
        "Array(String)",
        [(None, []), (["a", "ü"], ["a", "ü"])],  # ClickHouse has no Nullable(Array): NULL → []
    ),
    Case(
        "numeric(10,2)[] with nulls",
        array(nullable(decimal(10, 2))),
        "Array(Nullable(Decimal(10, 2)))",
        [([Decimal("1.50"), None], ["1.50", None])],
    ),
    Case(
        "date[]",
        array(semantic("int", "io.debezium.time.Date")),
        "Array(Date32)",
        [([-1, 0, 120529], ["1969-12-31", "1970-01-01", "2299-12-31"])],
    ),
]


# --- chDB ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = chdb_session.Session(str(tmp_path_factory.mktemp("chdb")))
    s.query(f"CREATE DATABASE IF NOT EXISTS {DB}")
    yield s
    s.cleanup()


def sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fastavro_decode(avro: Any, datum: Any) -> tuple[Any, Any]:
    """(value, parsed field type) as the projector sees them after schemaless_reader."""
    schema: Any = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Value",
            "namespace": "test",
            "fields": [{"name": "v", "type": avro}],
        }
    )
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"v": datum})
    buf.seek(0)
    record: Any = fastavro.schemaless_reader(buf, schema, schema)
    return record["v"], schema["fields"][0]["type"]


def query_rows(chdb: Any, sql: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in str(chdb.query(sql, "JSONEachRow")).splitlines() if line]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip_through_clickhouse(chdb: Any, case: Case) -> None:
    decoded = [fastavro_decode(case.avro, datum) for datum, _ in case.values]
    ct = column_type(decoded[0][1])
    assert ct.clickhouse == case.clickhouse
    assert column_type(case.avro).clickhouse == case.clickhouse  # raw registry JSON, too

    table = f"{DB}.`{case.id}`"
    expr = ct.clickhouse_input_expr
    if expr is None:
        column, key = f"v {ct.clickhouse}", "v"
    else:  # the hex text goes to an EPHEMERAL input column; the stored column decodes it
        column = f"vin {ct.clickhouse} EPHEMERAL, v {ct.clickhouse} DEFAULT {expr.format('vin')}"
        key = "vin"
    chdb.query(f"CREATE TABLE {table} (n UInt32, {column}) ENGINE = MergeTree ORDER BY n")
    rows = "\n".join(
        json.dumps({"n": n, key: ct.to_clickhouse(value)}, allow_nan=False)
        for n, (value, _) in enumerate(decoded)
    )
    chdb.query(f"INSERT INTO {table} (n, {key}) FORMAT JSONEachRow\n{rows}")

    got = query_rows(
        chdb,
        f"SELECT {case.read} AS r, toTypeName(v) AS t FROM {table} ORDER BY n SETTINGS {READ_SETTINGS}",
    )
    assert [row["r"] for row in got] == [expected for _, expected in case.values]
    assert {row["t"] for row in got} == {case.clickhouse}


def test_bytes_through_an_input_expression(chdb: Any) -> None:
    # The other way to apply clickhouse_input_expr: INSERT ... SELECT expr FROM input(...) on a
    # server; chDB takes the rows inline through format().
    ct = column_type(array(nullable("bytes")))
    chdb.query(
        f"CREATE TABLE {DB}.bytes_input (v {ct.clickhouse}) ENGINE = MergeTree ORDER BY tuple()"
    )
    row = json.dumps({"v": ct.to_clickhouse([b"\x00\xff", None, b"'\\"])})
    chdb.query(
        f"INSERT INTO {DB}.bytes_input SELECT {(ct.clickhouse_input_expr or '{}').format('v')} "
        f"FROM format(JSONEachRow, {sql_string('v ' + ct.clickhouse)}, {sql_string(row)})"
    )
    got = query_rows(chdb, f"SELECT arrayMap(x -> hex(x), v) AS r FROM {DB}.bytes_input")
    assert got == [{"r": ["00FF", None, "275C"]}]
    # Read back in the form an insert takes (the unchanged-TOAST lookup): the same bytes again.
    back = query_rows(
        chdb, f"SELECT {(ct.clickhouse_output_expr or '{}').format('v')} AS v FROM {DB}.bytes_input"
    )
    assert [None if x is None else bytes.fromhex(x) for x in back[0]["v"]] == [
        b"\x00\xff",
        None,
        b"'\\",
    ]


def test_parsed_named_type_reference() -> None:
    # parse_schema refers to a named type by its full name after its first definition
    assert column_type("io.debezium.data.VariableScaleDecimal").clickhouse == "String"
    assert (
        column_type(["null", "io.debezium.data.VariableScaleDecimal"]).clickhouse
        == "Nullable(String)"
    )


def test_decimal_without_connect_parameters_and_scale_over_precision() -> None:
    plain = {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3}
    assert column_type(plain).clickhouse == "Decimal(12, 3)"
    assert (
        column_type({**plain, "precision": 2, "scale": 4}).clickhouse == "Decimal(4, 4)"
    )  # PG 15+


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("avro", "named"),
    [
        (
            semantic("bytes", "io.debezium.data.Bits", **{"connect.parameters": {"length": "3"}}),
            "io.debezium.data.Bits",
        ),
        (
            {
                "type": "record",
                "name": "Point",
                "namespace": "io.debezium.data.geometry",
                "fields": [{"name": "x", "type": "double"}, {"name": "y", "type": "double"}],
                "connect.name": "io.debezium.data.geometry.Point",
            },
            "io.debezium.data.geometry.Point",
        ),
        (nullable(semantic("string", "io.debezium.data.Unheard")), "io.debezium.data.Unheard"),
        (["null", "int", "string"], "['null', 'int', 'string']"),
        ("null", "'null'"),
        ({"type": "map", "values": "string"}, "'map'"),
    ],
)
def test_unsupported_type(avro: Any, named: str) -> None:
    with pytest.raises(UnsupportedType, match=r"supported|no ClickHouse mapping") as err:
        column_type(avro)
    assert named in str(err.value)
    assert isinstance(err.value, SchemaError)


@pytest.mark.parametrize(
    ("avro", "value", "message"),
    [
        (semantic("int", "io.debezium.time.Date"), -25568, "1899-12-31"),
        (semantic("int", "io.debezium.time.Date"), 120530, "2300-01-01"),
        (semantic("int", "io.debezium.time.Date"), 2147483647, "2147483647"),
        (semantic("int", "io.debezium.time.Date"), -2147483648, "-2147483648"),
        (semantic("long", "io.debezium.time.MicroTimestamp"), 2**63 - 1, str(2**63 - 1)),
        (
            semantic("long", "io.debezium.time.Timestamp"),
            -2208988800001,
            "1899-12-31T23:59:59.999000",
        ),
        (
            semantic("string", "io.debezium.time.ZonedTimestamp"),
            "2300-01-01T00:00:00Z",
            "2300-01-01",
        ),
        (
            semantic("string", "io.debezium.time.ZonedTimestamp"),
            "2024-01-02T03:04:05",
            "no UTC offset",
        ),
        (decimal(10, 2), Decimal("NaN"), "NaN"),
    ],
)
def test_unconvertible_value(avro: Any, value: Any, message: str) -> None:
    convert = column_type(avro).to_clickhouse
    with pytest.raises(UnconvertibleValue) as err:
        convert(value)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


# Postgres' infinities as Debezium sends them (seen on the real stack: dates differ between
# streaming and snapshot reads), and a finite value of each type.
INFINITIES = [
    ("io.debezium.time.Date", "Int32", -2147472692, "2299-12-31"),
    ("io.debezium.time.Date", "Int32", -2147472691, "1900-01-01"),
    ("io.debezium.time.Date", "Int32", -622191234, "2299-12-31"),  # from a snapshot read
    ("io.debezium.time.Date", "Int32", -625821272, "1900-01-01"),
    ("io.debezium.time.Date", "Int32", 19782, "2024-02-29"),
    ("io.debezium.time.Timestamp", "Int64", 9223372036825200, "2299-12-31 23:59:59.999999"),
    ("io.debezium.time.Timestamp", "Int64", -9223372036832400, "1900-01-01 00:00:00.000000"),
    ("io.debezium.time.Timestamp", "Int64", 1704164645123, "2024-01-02 03:04:05.123000"),
    ("io.debezium.time.MicroTimestamp", "Int64", 9223372036825200000, "2299-12-31 23:59:59.999999"),
    (
        "io.debezium.time.MicroTimestamp",
        "Int64",
        -9223372036832400000,
        "1900-01-01 00:00:00.000000",
    ),
    ("io.debezium.time.MicroTimestamp", "Int64", -1, "1969-12-31 23:59:59.999999"),
    ("io.debezium.time.ZonedTimestamp", "String", "infinity", "2299-12-31 23:59:59.999999"),
    ("io.debezium.time.ZonedTimestamp", "String", "-infinity", "1900-01-01 00:00:00.000000"),
    (
        "io.debezium.time.ZonedTimestamp",
        "String",
        "2024-01-02T03:04:05.5Z",
        "2024-01-02 03:04:05.500000",
    ),
]


@pytest.mark.parametrize(("name", "avro_type", "datum", "stored"), INFINITIES)
def test_infinity_is_the_columns_last_or_first_value_on_both_paths(
    chdb: Any, name: str, avro_type: str, datum: Any, stored: str
) -> None:
    """The per-message conversion and the fast path's SQL form (over the value as ClickHouse's
    Avro reader types it) store the same value, and the fast path's check lets it through."""
    avro = {"Int32": "int", "Int64": "long"}.get(avro_type, "string")
    ct = column_type(nullable(semantic(avro, name)))
    assert ct.to_clickhouse(datum) == stored  # the per-message path
    assert ct.avro_sql and ct.avro_check
    value = sql_string(datum) if isinstance(datum, str) else f"to{avro_type}({datum})"
    got = query_rows(
        chdb,
        f"SELECT toString(CAST({ct.avro_sql.format(value)}, {sql_string(ct.clickhouse)})) AS v, "
        f"{ct.avro_check.format(value)} AS ok",
    )
    assert got == [{"v": stored, "ok": 1}]


@pytest.mark.parametrize(
    ("name", "avro_type", "datum"),
    [
        ("io.debezium.time.Date", "Int32", 2147483647),  # finite, beyond 2299
        ("io.debezium.time.MicroTimestamp", "Int64", 2**63 - 1),
        ("io.debezium.time.ZonedTimestamp", "String", "2300-01-01T00:00:00Z"),
    ],
)
def test_other_values_out_of_range_fail_the_fast_paths_check(
    chdb: Any, name: str, avro_type: str, datum: Any
) -> None:
    avro = {"Int32": "int", "Int64": "long"}.get(avro_type, "string")
    ct = column_type(semantic(avro, name))
    with pytest.raises(UnconvertibleValue):
        ct.to_clickhouse(datum)
    assert ct.avro_check
    value = sql_string(datum) if isinstance(datum, str) else f"to{avro_type}({datum})"
    assert query_rows(chdb, f"SELECT {ct.avro_check.format(value)} AS ok") == [{"ok": 0}]
