"""Every mapping of the type map, through the real stack: value in Postgres = value in ClickHouse.

Each case names a Postgres type, values written to it, and two expressions that render a column
of that type as the same canonical text on each side (Postgres' `to_char`, `trim_scale`, ...;
ClickHouse's `toString`, `hex`, ...). Both sides are computed by the databases, never by the code
under test, so a wrong conversion anywhere in Debezium → Avro → projector → ClickHouse shows up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import psycopg

from projector.config import load_config
from projector.replicas.source_tables import captured_tables, debezium_type
from schemas.type_map import column_type
from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess


@dataclass(frozen=True)
class Case:
    column: str
    pg_type: str
    values: tuple[str, ...]  # SQL literals, one per row (rows beyond a case's values get NULL)
    pg_text: str = "{}::text"
    ch_text: str = "toString({})"


# Postgres renders its infinities as the values the replica documents for them.
INFINITE = (
    "CASE WHEN {{0}} = 'infinity' THEN '{last}' WHEN {{0}} = '-infinity' THEN '{first}' "
    "ELSE {finite} END"
)

CASES = (
    Case("c_smallint", "smallint", ("-32768", "32767", "0")),
    Case("c_int", "integer", ("-2147483648", "2147483647", "7")),
    Case("c_bigint", "bigint", ("-9223372036854775808", "9223372036854775807", "42")),
    Case("c_numeric", "numeric(12,3)", ("123456789.123", "-0.001", "0"), "trim_scale({})::text"),
    Case(
        "c_numeric_wide",
        "numeric(40,10)",
        ("123456789012345678901234567890.0123456789", "-1.5", "0.0000000001"),
        "trim_scale({})::text",
    ),
    # Debezium strips trailing zeros of an unconstrained numeric: equal value, display scale lost.
    Case(
        "c_numeric_free",
        "numeric",
        ("-123.4500", "1e-20", "98765432109876543210.5", "1000"),
        "trim_scale({})::text",
        "{}",
    ),
    Case("c_real", "real", ("'NaN'", "'-Infinity'", "3.25"), "lower({}::text)"),
    Case(
        "c_double",
        "double precision",
        ("'Infinity'", "-1.0000000000000002", "1e-300"),
        "lower({}::text)",
    ),
    Case("c_bool", "boolean", ("true", "false", "true")),
    Case("c_text", "text", ("'plain'", "'üñíçødé ✓ ''quoted'' \\ back'", "''"), "{}", "{}"),
    Case("c_varchar", "varchar(20)", ("'short'", "'x'", "'twenty chars max...'"), "{}", "{}"),
    Case("c_char", "char(5)", ("'ab'", "'abcde'", "' '"), "{}::text", "trimRight({})"),
    Case(
        "c_bytea",
        "bytea",
        ("'\\x00ff10'::bytea", "''::bytea", "'\\xdeadbeef'::bytea"),
        "encode({}, 'hex')",
        "lower(hex({}))",
    ),
    Case("c_date", "date", ("'2024-02-29'", "'1900-01-01'", "'2299-12-31'")),
    Case("c_time", "time", ("'12:34:56.5'", "'00:00:00'", "'23:59:59.999999'"), ch_text="{}"),
    Case(
        "c_timestamp",
        "timestamp",
        ("'2024-01-02 03:04:05.123456'", "'1969-12-31 23:59:59'", "'2100-06-30 12:00:00.000001'"),
        "to_char({}, 'YYYY-MM-DD HH24:MI:SS.US')",
    ),
    Case(
        "c_timestamptz",
        "timestamptz",
        ("'2024-01-02 03:04:05.123456+02'", "'1969-07-20 20:17:40Z'", "'2038-01-19 03:14:08-05'"),
        "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
    ),
    Case(
        "c_interval",
        "interval",
        ("'1 year 2 months 3 days 04:05:06.5'", "'-7 days'", "'0'"),
        "to_char({}, 'YYYY MM DD HH24 MI SS US')",
        "{}",
    ),
    Case(
        "c_uuid",
        "uuid",
        (
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "'00000000-0000-0000-0000-000000000000'",
            "gen_random_uuid()",
        ),
    ),
    Case("c_json", "json", ("'{\"a\": [1, 2.5, null]}'", "'[]'", "'\"str\"'"), "{}::text", "{}"),
    Case(
        "c_jsonb",
        "jsonb",
        ('\'{"b": {"c": true}, "a": 1}\'', "'null'", "'[1,\"x\"]'"),
        "{}::text",
        "{}",
    ),
    Case(
        "c_text_array",
        "text[]",
        ("ARRAY['a', 'b c', '']", "ARRAY[]::text[]", "ARRAY['x', NULL]"),
        "to_json({})::text",
        "toJSONString({})",
    ),
    Case(
        "c_int_array",
        "integer[]",
        ("ARRAY[1, -2, 3]", "'{}'::int[]", "ARRAY[NULL, 5]"),
        "to_json({})::text",
        "toJSONString({})",
    ),
    Case("c_enum", "{enum}", ("'PENDING'", "'SHIPPED'", "'PENDING'")),
    Case(
        "c_inet",
        "inet",
        ("'192.168.0.1'", "'10.0.0.0/8'", "'::1'"),
        "nullif(format('%s', {0}), '')",
        "{}",
    ),
    # Postgres' infinities (an open-ended `valid_to`): the column's last / first value.
    Case(
        "c_date_inf",
        "date",
        ("'infinity'", "'-infinity'", "'2024-02-29'"),
        INFINITE.format(last="2299-12-31", first="1900-01-01", finite="{0}::text"),
    ),
    *(
        Case(
            f"c_{name}_inf",
            pg_type,
            ("'infinity'", "'-infinity'", "'2024-01-02 03:04:05.123456+02'"),
            INFINITE.format(
                last="2299-12-31 23:59:59.999999",
                first="1900-01-01 00:00:00.000000",
                finite=f"to_char({{0}}{zone}, 'YYYY-MM-DD HH24:MI:SS.US')",
            ),
        )
        for name, pg_type, zone in (
            ("timestamp0", "timestamp(0)", ""),  # Debezium: milliseconds
            ("timestamp3", "timestamp(3)", ""),
            ("timestamp", "timestamp", ""),  # microseconds
            ("timestamptz", "timestamptz", " AT TIME ZONE 'UTC'"),  # text
        )
    ),
    Case(
        "c_date_array_inf",
        "date[]",
        ("ARRAY['infinity'::date, '2024-02-29']", "ARRAY['-infinity'::date]", "ARRAY[]::date[]"),
        "to_json(ARRAY(SELECT "
        + INFINITE.format(last="2299-12-31", first="1900-01-01", finite="x::text").replace(
            "{0}", "x"
        )
        + " FROM unnest({0}) AS x))::text",
        "toJSONString(arrayMap(x -> toString(x), {}))",
    ),
    # numeric NaN / ±Infinity: decimal.handling.mode=precise has no Avro decimal for them, so
    # Debezium sends NULL (in a NOT NULL column its task fails instead: not tested here).
    Case(
        "c_numeric_nan",
        "numeric(10,2)",
        ("'NaN'", "12.50", "'NaN'"),
        "CASE WHEN {0} = 'NaN' THEN NULL ELSE trim_scale({0})::text END",
    ),
    Case(
        "c_numeric_free_special",
        "numeric",
        ("'NaN'", "'Infinity'", "'-Infinity'", "'1.5'"),
        "CASE WHEN {0} IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE {0}::text END",
        "{}",
    ),
    Case(
        "c_money",
        "money",
        ("1234.56", "-0.01", "92233720368547758.07"),
        "trim_scale({}::numeric)::text",
    ),
)


def test_every_type_round_trips_through_the_real_stack(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    suffix = projector.unique
    table, enum = f"types_{suffix}", f"status_{suffix}"
    stack.sql(f"CREATE TYPE {enum} AS ENUM ('PENDING', 'SHIPPED')")
    columns = ", ".join(f"{c.column} {c.pg_type.format(enum=enum)}" for c in CASES)
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, {columns})")
    stack.apply()
    rows = max(len(c.values) for c in CASES)
    for row in range(rows):
        names = ", ".join(c.column for c in CASES)
        values = ", ".join(c.values[row] if row < len(c.values) else "NULL" for c in CASES)
        stack.sql(f"INSERT INTO {table} (id, {names}) VALUES ({row}, {values})")
    stack.sql(f"INSERT INTO {table} (id) VALUES ({rows})")  # every column NULL
    # An update through the streaming path too (the inserts may be read by the snapshot).
    stack.sql(f"UPDATE {table} SET c_text = c_text || '!' WHERE id = 0")
    projector.catch_up()

    pg_select = ", ".join(c.pg_text.format(c.column) for c in CASES)
    ch_select = ", ".join(f"{c.ch_text.format(c.column)} AS {c.column}" for c in CASES)
    source = stack.sql(f"SELECT id, {pg_select} FROM {table} ORDER BY id")
    replica = projector.sql(
        f"SELECT id, {ch_select} FROM {projector.replica_db}.{table} FINAL ORDER BY id"
    )
    assert [r["id"] for r in replica] == [r[0] for r in source]
    mismatches = []
    for pg_row, ch_row in zip(source, replica, strict=True):
        for case, pg_value in zip(CASES, pg_row[1:], strict=True):
            ch_value = ch_row[case.column]
            if canonical(case, pg_value) != canonical(case, ch_value):
                mismatches.append(f"{case.column} row {pg_row[0]}: pg={pg_value!r} ch={ch_value!r}")
    assert not mismatches, "\n".join(mismatches)

    # A replica created before a table's first event (projector/replicas/source_tables.py) has
    # the types this one got from Debezium's real schema: every column it maps, the same type.
    with psycopg.connect(stack.admin_dsn) as conn:
        publication = load_config(env=projector.env).publication
        (source,) = captured_tables(conn, publication, ["public"], re.escape(table))
    derived = {
        c.name: column_type(avro).clickhouse
        for c in source.columns
        if (avro := debezium_type(c)) is not None
    }
    types = projector.sql(
        "SELECT "
        + ", ".join(f"toTypeName({name}) AS {name}" for name in derived)
        + f" FROM {projector.replica_db}.{table} LIMIT 1"
    )[0]
    assert derived == types
    unmapped = {c.name for c in source.columns} - set(derived)
    assert unmapped <= {c.column for c in CASES if "[]" in c.pg_type}, unmapped

    # `projector verify` computes the same text on both sides for every type here
    # (schemas/canonical_text.py): it finds the table equal, every column compared.
    verified = projector.cli("verify", "--json", f"public.{table}")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    (result,) = json.loads(verified.stdout)["results"]
    assert result["not_compared"] == [] and result["postgres_rows"] == rows + 1, result


def canonical(case: Case, value: object) -> object:
    """Spelling differences only, never value differences: float specials, NULL arrays, and
    intervals (Postgres `to_char` fields vs Debezium's ISO-8601 `PnYnMnDTnHnMn.nS`)."""
    if isinstance(value, str) and case.pg_type == "interval":
        return interval_fields(value)
    if isinstance(value, str) and case.pg_type in ("real", "double precision"):
        return {"infinity": "inf", "-infinity": "-inf"}.get(value.lower(), value.lower())
    if case.pg_type.endswith("[]") and value is None:
        return "[]"  # ClickHouse has no Nullable(Array): a NULL array is stored empty (type_map.md)
    return value


ISO_INTERVAL = re.compile(r"P(-?\d+)Y(-?\d+)M(-?\d+)DT(-?\d+)H(-?\d+)M(-?\d+)(?:\.(\d+))?S")


def interval_fields(text: str) -> tuple[int, ...]:
    """(years, months, days, hours, minutes, seconds, microseconds) of either spelling."""
    iso = ISO_INTERVAL.fullmatch(text)
    if iso is None:
        return tuple(int(part) for part in text.split())  # Postgres to_char fields
    *whole, fraction = iso.groups()
    seconds = int(whole[-1])
    micros = int((fraction or "0").ljust(6, "0")[:6]) * (-1 if whole[-1].startswith("-") else 1)
    return (*(int(p) for p in whole[:-1]), seconds, micros)
