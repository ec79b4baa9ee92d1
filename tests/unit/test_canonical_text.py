"""The canonical texts `projector verify` hashes (schemas/canonical_text.py).

Every Postgres type of the type round-trip test (tests/integration/test_type_roundtrip.py, which
also runs `projector verify` over a table of all of them) has a rule; and the ClickHouse side of
each rule, evaluated in chDB over values as the type map stores them, gives the text the Postgres
side gives for the same value (written by hand from Postgres semantics, like test_type_map.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from projector.clickhouse import ChdbBackend
from schemas.canonical_text import CanonicalText, canonical_text, field
from tests.integration.test_type_roundtrip import CASES

# The roundtrip test's SQL type spellings → pg_type.typname (what verify reads from Postgres).
TYPNAME = {
    "smallint": "int2",
    "integer": "int4",
    "bigint": "int8",
    "real": "float4",
    "double precision": "float8",
    "boolean": "bool",
    "char": "bpchar",
    "{enum}": "enum",
}


def typname(sql_type: str) -> tuple[str, str | None]:
    """(type, element type of an array or None) of a SQL type spelling."""
    if sql_type.endswith("[]"):
        return "", typname(sql_type[:-2])[0]
    bare = re.sub(r"\(.*\)", "", sql_type).strip()
    return TYPNAME.get(bare, bare), None


@pytest.mark.parametrize("case", CASES, ids=[c.column for c in CASES])
def test_every_type_of_the_roundtrip_test_has_a_canonical_text(case: object) -> None:
    pg_type, element = typname(case.pg_type)  # type: ignore[attr-defined]
    rule = canonical_text(pg_type, element)
    assert rule is not None, case
    assert "%" not in rule.postgres, "the Postgres side is sent with %s parameters"


# (Postgres type, element type, the replica's column type, a stored value as a ClickHouse
# literal, the text Postgres' side gives for the same value)
AGREEING = [
    ("int8", None, "Int64", "-9223372036854775808", "-9223372036854775808"),
    ("numeric", None, "Decimal(12, 3)", "'-0.010'", "-0.01"),  # trim_scale(-0.010)
    ("numeric", None, "Decimal(12, 3)", "'0.000'", "0"),
    ("numeric", None, "Nullable(String)", "NULL", None),  # NaN: Debezium sends NULL
    (
        "numeric",
        None,
        "Decimal(40, 10)",
        "'123456789012345678901234567890.0123456789'",
        "123456789012345678901234567890.0123456789",
    ),
    ("money", None, "Decimal(38, 2)", "'-0.01'", "-0.01"),
    ("float8", None, "Float64", "0.1", "3fb999999999999a"),  # encode(float8send(0.1), 'hex')
    ("float8", None, "Float64", "-inf", "fff0000000000000"),
    ("float8", None, "Float64", "nan", "nan"),
    ("float4", None, "Float32", "3.25", "40500000"),
    # zero's bytes are all zero: reinterpretAsString would drop them (encode(float4send(0), 'hex'))
    ("float4", None, "Float32", "0", "00000000"),
    ("float8", None, "Float64", "0", "0000000000000000"),
    ("float8", None, "Float64", "-0.0", "8000000000000000"),
    ("bool", None, "Bool", "true", "true"),
    ("bpchar", None, "String", "'ab   '", "ab"),  # 'ab'::char(5)::text
    ("bytea", None, "String", "unhex('00FF10')", "00ff10"),
    ("date", None, "Date32", "'2299-12-31'", "2299-12-31"),  # also 'infinity'
    (
        "timestamp",
        None,
        "DateTime64(6, 'UTC')",
        "'1969-12-31 23:59:59'",
        "1969-12-31 23:59:59.000000",
    ),
    (
        "timestamptz",
        None,
        "DateTime64(6, 'UTC')",
        "'1900-01-01 00:00:00'",
        "1900-01-01 00:00:00.000000",
    ),  # '-infinity'
    ("interval", None, "String", "'P1Y2M3DT4H5M6.5S'", "1 2 3 4 5 6.5"),
    ("interval", None, "String", "'P0Y0M-7DT0H0M0S'", "0 0 -7 0 0 0"),
    (
        "uuid",
        None,
        "UUID",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ),
    ("enum", None, "LowCardinality(String)", "'PENDING'", "PENDING"),
    ("inet", None, "Nullable(String)", "'192.168.0.1'", "192.168.0.1"),
    ("text", None, "Nullable(String)", "''", ""),
    ("", "text", "Array(Nullable(String))", "['x', NULL, '']", "1:x,-,0:"),
    ("", "int4", "Array(Int32)", "[]", ""),  # also a NULL array: ClickHouse stores it empty
    ("", "date", "Array(Date32)", "['2024-02-29']", "10:2024-02-29"),
]


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(str(tmp_path_factory.mktemp("chdb")))
    yield backend
    backend.close()


@pytest.mark.parametrize(("pg_type", "element", "column", "stored", "expected"), AGREEING)
def test_clickhouse_gives_the_text_postgres_gives(
    chdb: ChdbBackend,
    pg_type: str,
    element: str | None,
    column: str,
    stored: str,
    expected: str | None,
) -> None:
    rule = canonical_text(pg_type, element)
    assert rule is not None
    sql = rule.clickhouse.format(f"CAST({stored} AS {column})")
    (row,) = chdb.rows(f"SELECT {sql} AS t")
    assert row["t"] == expected


def test_a_field_tells_null_from_every_text(chdb: ChdbBackend) -> None:
    each = field(CanonicalText("{0}", "{0}")).clickhouse
    values = ["NULL", "''", "'-'", "'0:'"]
    found = [
        chdb.rows(f"SELECT {each.format(f'CAST({v} AS Nullable(String))')} AS t")[0]["t"]
        for v in values
    ]
    assert found == ["-", "0:", "1:-", "2:0:"]
