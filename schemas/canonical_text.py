"""One text per column value that Postgres and its ClickHouse replica both compute alike.

`projector verify` (projector/operations/verify.py) hashes rows on both sides and compares the hashes, so
each side must turn a value into the *same* text: `RULES` gives, per Postgres type (its
`pg_type.typname`; `enum` for every enum type), a Postgres SQL expression and a ClickHouse SQL
expression over the column (`{0}`), for the ClickHouse type schemas/type_map.py gives it. They
agree wherever the type map is exact; where a spelling differs, the expressions agree on a form
both can produce:

- **numeric** and **money**: the value without trailing zeros (`trim_scale`; ClickHouse prints a
  Decimal so). NaN and ±Infinity are NULL (Debezium sends NULL for them: type_map.py).
- **real**, **double precision**: the IEEE bytes in hex (text forms differ: `1e+20` against
  `100000000000000000000`); every NaN is `nan`.
- **date**, **timestamp**, **timestamptz**: `YYYY-MM-DD[ HH:MI:SS.US]` (timestamptz in UTC), and
  Postgres' infinities as the first / last value the replica stores for them (`INFINITY`).
- **char(n)**: without trailing blanks (Postgres' own text form; Debezium sends the padding).
- **bytea**: lower-case hex. **interval**: the six fields Debezium's ISO-8601 text carries
  (years, months, days, hours, minutes, seconds), seconds without trailing zeros.
- **inet**: its output form (`192.168.0.1`, where `::text` would add `/32`).
- No rule holds a `%`: the Postgres side is sent with query parameters (`%s`).
- **arrays** (of a type with a rule): the elements' texts, each length-prefixed, joined by `,`.
  A NULL array is empty, as ClickHouse stores it.
- **NULL** is distinct from every text: `field` prefixes a value with its length in bytes
  (`5:hello`) and writes NULL as `-`, so a row's fields concatenate without ambiguity.

A type without a rule is not compared (`projector verify` names such columns): `timetz`
(Debezium sends it in UTC, `12:34:56Z`, Postgres keeps the offset), `hstore` (sent as JSON),
ranges, geometric and bit types, and columns an upcaster retypes (their replica holds another
type). The integration test of every type (tests/integration/test_type_roundtrip.py) runs
`projector verify` over a table of every type listed here and requires it to pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.type_map import FIRST_DATE, FIRST_INSTANT, LAST_DATE, LAST_INSTANT


@dataclass(frozen=True)
class CanonicalText:
    postgres: str  # SQL over the column `{0}`, text or NULL
    clickhouse: str  # the same text in ClickHouse SQL


def _infinite(finite: str, last: str, first: str) -> str:
    """Postgres' infinities as the values the replica stores for them (type_map.INFINITY)."""
    return (
        f"CASE WHEN {{0}} = 'infinity' THEN '{last}' WHEN {{0}} = '-infinity' THEN '{first}' "
        f"ELSE {finite} END"
    )


AS_TEXT = CanonicalText("{0}::text", "toString({0})")
DECIMAL = CanonicalText(
    "CASE WHEN {0}::text IN ('NaN', 'Infinity', '-Infinity') THEN NULL "
    "ELSE trim_scale({0})::text END",
    "toString({0})",
)
WALL_CLOCK = "to_char({0}, 'YYYY-MM-DD HH24:MI:SS.US')"
INTERVAL_ISO = r"P(-?\\d+)Y(-?\\d+)M(-?\\d+)DT(-?\\d+)H(-?\\d+)M(-?[0-9.]+)S"


def _float(width: int) -> CanonicalText:
    return CanonicalText(
        f"CASE WHEN {{0}} = 'NaN' THEN 'nan' ELSE encode(float{width}send({{0}}), 'hex') END",
        "if(isNaN({0}), 'nan', lower(hex(reverse(reinterpretAsFixedString({0})))))",
    )


RULES: dict[str, CanonicalText] = {
    "int2": AS_TEXT,
    "int4": AS_TEXT,
    "int8": AS_TEXT,
    "numeric": DECIMAL,  # Decimal(p, s), or String beyond 76 digits and without a precision
    "money": CanonicalText("trim_scale({0}::numeric)::text", "toString({0})"),
    "float4": _float(4),
    "float8": _float(8),
    "bool": AS_TEXT,  # true / false on both sides
    "text": AS_TEXT,
    "varchar": AS_TEXT,
    "bpchar": CanonicalText("{0}::text", "trimRight({0})"),
    "bytea": CanonicalText("encode({0}, 'hex')", "lower(hex({0}))"),
    "date": CanonicalText(
        _infinite("to_char({0}, 'YYYY-MM-DD')", LAST_DATE, FIRST_DATE), "toString({0})"
    ),
    "time": AS_TEXT,  # the replica holds Postgres' own text form (type_map._time)
    "timestamp": CanonicalText(_infinite(WALL_CLOCK, LAST_INSTANT, FIRST_INSTANT), "toString({0})"),
    "timestamptz": CanonicalText(
        _infinite(WALL_CLOCK.format("{0} AT TIME ZONE 'UTC'"), LAST_INSTANT, FIRST_INSTANT),
        "toString({0})",
    ),
    "interval": CanonicalText(
        "CASE WHEN {0} IS NOT NULL THEN concat_ws(' ', extract(year FROM {0})::bigint, "
        "extract(month FROM {0})::bigint, extract(day FROM {0})::bigint, "
        "extract(hour FROM {0})::bigint, extract(minute FROM {0})::bigint, "
        "trim_scale(extract(second FROM {0}))::text) END",
        f"if(isNull({{0}}), NULL, arrayStringConcat(arrayMap(i -> if(i = 6, "
        f"toString(toDecimal64(extractGroups(assumeNotNull({{0}}), '{INTERVAL_ISO}')[i], 6)), "
        f"extractGroups(assumeNotNull({{0}}), '{INTERVAL_ISO}')[i]), range(1, 7)), ' '))",
    ),
    "uuid": AS_TEXT,
    "json": AS_TEXT,
    "jsonb": AS_TEXT,
    "enum": AS_TEXT,
    # inet's output form: the mask only when it is not the full length (`::text` always adds it)
    "inet": CanonicalText(
        "CASE WHEN masklen({0}) = CASE WHEN family({0}) = 4 THEN 32 ELSE 128 END "
        "THEN host({0}) ELSE {0}::text END",
        "{0}",
    ),
}


def field(rule: CanonicalText) -> CanonicalText:
    """A value's text as one self-delimiting field: `<length in bytes>:<text>`, NULL as `-`."""
    return CanonicalText(
        f"coalesce(octet_length({rule.postgres})::text || ':' || {rule.postgres}, '-')",
        f"ifNull(concat(toString(length({rule.clickhouse})), ':', {rule.clickhouse}), '-')",
    )


def _array(element: CanonicalText) -> CanonicalText:
    each = field(element)
    return CanonicalText(
        "array_to_string(ARRAY(SELECT "
        + each.postgres.format("u.x")
        + " FROM unnest({0}) WITH ORDINALITY AS u(x, n) ORDER BY u.n), ',')",
        "arrayStringConcat(arrayMap(x -> " + each.clickhouse.format("x") + ", {0}), ',')",
    )


def canonical_text(pg_type: str, element_type: str | None = None) -> CanonicalText | None:
    """The rule for a Postgres column type (`element_type` for an array), None: not compared."""
    if element_type is not None:
        element = RULES.get(element_type)
        return None if element is None else _array(element)
    return RULES.get(pg_type)
