"""Debezium Avro field types → ClickHouse column types, and the value conversion between them.

`column_type(avro_type)` takes a field's Avro ``type`` (a union list, a dict, or a type name; as
given by the registry JSON or after `fastavro.parse_schema`, which keeps the ``connect.*``
properties) and returns a `ColumnType`: the ClickHouse type and a function turning the value
fastavro decoded into a JSON value that ClickHouse's ``JSONEachRow`` input parses *exactly* into
that type. Exactness is the rule: the value in ClickHouse equals the value in Postgres.

A type is recognised by the first of its ``connect.name``, ``logicalType``, ``connect.type`` or
Avro type (the full name for named types) and looked up in `RULES`; an unknown ``connect.name``
never falls back to the Avro primitive beneath it. Unions with ``null`` and arrays are the only
structural cases:

- ``["null", T]`` → ``Nullable(T)``; ``LowCardinality(String)`` → ``LowCardinality(Nullable(String))``.
- ``{"type": "array", "items": T}`` → ``Array(T)``. ClickHouse has no ``Nullable(Array(...))``:
  a NULL array is stored as ``[]``.

Decisions worth knowing:

- **bytea** → ``String`` holding the exact bytes. ``JSONEachRow`` cannot carry arbitrary bytes:
  JSON strings are Unicode and ClickHouse stores them as UTF-8 (``"\\u00ff"`` becomes ``C3 BF``).
  So the JSON value is the *hex* text and `ColumnType.clickhouse_input_expr` is ``"unhex({})"``
  (``arrayMap(x -> unhex(x), {})`` for arrays); ``{}`` is the column carrying the hex. Apply it
  either as an input column ``c__input T EPHEMERAL, c T DEFAULT unhex(c__input)`` (insert with an
  explicit column list naming ``c__input``) or as
  ``INSERT INTO t (c) SELECT unhex(c) FROM input('c T') FORMAT JSONEachRow``. In both, ``T`` is
  `ColumnType.clickhouse` unchanged: hex text is a ``String`` too. Reading a stored value back in
  the form an insert takes (the unchanged-TOAST lookup) is `ColumnType.clickhouse_output_expr`,
  ``hex({})``: the raw bytes are no JSON text either.
- **numeric(p,s)** → ``Decimal(p, s)`` (``Decimal(s, s)`` when Postgres 15+ has s > p); beyond
  76 digits ClickHouse has no Decimal, so ``String`` with the exact text. **numeric** without
  precision (``VariableScaleDecimal``) → ``String``, the exact decimal text Debezium sends (it
  strips trailing zeros, so the display scale is lost, the value is not).
  **money** arrives as a decimal without ``connect.decimal.precision`` (Confluent then writes
  precision 64) → ``Decimal(38, scale)``.
- **timestamp** → ``DateTime64(6, 'UTC')`` with wall-clock text: the column's own zone is UTC, so
  the wall clock is stored and printed unchanged whatever the server's zone (a zone with DST gaps
  would lose or shift wall-clock times). **timestamptz** → ``DateTime64(6, 'UTC')``, the instant.
- ``Date32``/``DateTime64`` hold 1900-01-01..2299-12-31 (ClickHouse 25.8). Postgres' ``infinity``
  and ``-infinity`` (a common ``valid_to`` sentinel) become the last and first value the column
  can hold, ``2299-12-31 [23:59:59.999999]`` and ``1900-01-01 [00:00:00]`` (`INFINITY`); any other
  value outside the range raises `UnconvertibleValue` so the event can be dead-lettered.
- ``numeric`` NaN and ±Infinity: with ``decimal.handling.mode=precise`` Debezium cannot write them
  as an Avro decimal and sends NULL (so they are NULL here); in a NOT NULL column its task fails.
- ``real``/``double precision`` NaN and ±Infinity are sent as ``"nan"``, ``"inf"``, ``"-inf"``.
- Unmapped (`UnsupportedType`): ``bit``/``varbit`` (``io.debezium.data.Bits``), PostGIS
  (``io.debezium.data.geometry.*``), anything else not in `RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from schemas.errors import SchemaError


class UnsupportedType(SchemaError):
    """An Avro field type with no rule in the type map."""


class UnconvertibleValue(SchemaError):
    """A value the ClickHouse column type cannot hold exactly (e.g. a date outside Date32)."""


@dataclass(frozen=True)
class ColumnType:
    clickhouse: str
    to_clickhouse: Callable[[Any], Any]
    clickhouse_input_expr: str | None = None  # wrap the input column, e.g. "unhex({})"
    # The same conversion in ClickHouse SQL, for the fast path (projector/replicas/fast_path.py): `{}` is
    # the value as ClickHouse's AvroConfluent format reads it (a Debezium date is an Int32 of
    # days, say). None: no SQL form; such a column sends its batch down the per-message path.
    avro_sql: str | None = "{}"
    # A condition the value read from Avro must meet, else the fast path rejects the batch and
    # the per-message path dead-letters the event (the same range checks as `to_clickhouse`).
    avro_check: str | None = None
    # The inverse of `clickhouse_input_expr`: a stored value back in the form an insert takes
    # (the value of the input column), e.g. "hex({})". None with no input expression.
    clickhouse_output_expr: str | None = None


# --- value conversions: fastavro value → JSON value for JSONEachRow ---------------------------

EPOCH = datetime(1970, 1, 1)
MIN_DATETIME, MAX_DATETIME = datetime(1900, 1, 1), datetime(2300, 1, 1)  # Date32 / DateTime64
DECIMAL_MAX_DIGITS = 76
MONEY_PRECISION = 38


def _same(value: Any) -> Any:
    return value


def _float(value: float) -> float | str:
    if math.isnan(value):
        return "nan"
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else value


def _hex(value: bytes) -> str:
    return value.hex()


def _decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        raise UnconvertibleValue(f"numeric {value} has no ClickHouse Decimal/String equivalent")
    return format(value, "f")


def _variable_scale_decimal(value: dict[str, Any]) -> str:
    unscaled = int.from_bytes(value["value"], "big", signed=True)
    return _decimal_text(Decimal(f"{unscaled}e{-value['scale']}"))  # exact, no context rounding


def _in_range(moment: datetime, raw: Any, what: str) -> datetime:
    if not MIN_DATETIME <= moment < MAX_DATETIME:
        raise UnconvertibleValue(
            f"{what} {raw!r} ({moment.isoformat()}) is outside ClickHouse's range 1900-01-01..2299-12-31"
        )
    return moment


def _from_epoch(raw: int, what: str, **unit: int) -> datetime:
    try:
        return _in_range(EPOCH + timedelta(**unit), raw, what)
    except OverflowError:
        raise UnconvertibleValue(
            f"{what} {raw!r} is outside ClickHouse's range 1900-01-01..2299-12-31"
        ) from None


# Postgres' `infinity` / `-infinity` as Debezium encodes them, per type, and what is stored for
# them: the last / first value ClickHouse's column holds, so `valid_to > now()` stays true for an
# open-ended row. Timestamps' infinities arrive as Postgres' JDBC driver gives them (in ms or µs
# since the epoch), the same from the snapshot and from streaming. Dates arrive as day counts
# that overflowed 32 bits, and differently by path: streaming (pgoutput) adds the 10,957 days
# from 1970 to 2000 to Postgres' own extremes (+infinity -2147472692, -infinity -2147472691);
# snapshot reads and array elements go through the JDBC driver (-622191234, -625821272). All
# four were read off the real stack (tests/integration/test_fast_path.py and
# test_type_roundtrip.py meet both paths); none is a date anyone stores.
LAST_DATE, FIRST_DATE = "2299-12-31", "1900-01-01"
LAST_INSTANT, FIRST_INSTANT = "2299-12-31 23:59:59.999999", "1900-01-01 00:00:00.000000"
INFINITY: dict[str, dict[Any, str]] = {
    "io.debezium.time.Date": {
        -2147472692: LAST_DATE,  # streamed
        -2147472691: FIRST_DATE,
        -622191234: LAST_DATE,  # snapshot read, array element
        -625821272: FIRST_DATE,
    },
    "io.debezium.time.Timestamp": {
        9223372036825200: LAST_INSTANT,
        -9223372036832400: FIRST_INSTANT,
    },
    "io.debezium.time.MicroTimestamp": {
        9223372036825200000: LAST_INSTANT,
        -9223372036832400000: FIRST_INSTANT,
    },
    "io.debezium.time.ZonedTimestamp": {"infinity": LAST_INSTANT, "-infinity": FIRST_INSTANT},
}
DATE_INFINITY = INFINITY["io.debezium.time.Date"]
MILLI_INFINITY = INFINITY["io.debezium.time.Timestamp"]
MICRO_INFINITY = INFINITY["io.debezium.time.MicroTimestamp"]
ZONED_INFINITY = INFINITY["io.debezium.time.ZonedTimestamp"]


def _date(days: int) -> str:
    if days in DATE_INFINITY:
        return DATE_INFINITY[days]
    return _from_epoch(days, "date (days since epoch)", days=days).date().isoformat()


def _micro_timestamp(micros: int) -> str:
    if micros in MICRO_INFINITY:
        return MICRO_INFINITY[micros]
    return _from_epoch(micros, "timestamp (µs)", microseconds=micros).isoformat(" ", "microseconds")


def _milli_timestamp(millis: int) -> str:
    if millis in MILLI_INFINITY:
        return MILLI_INFINITY[millis]
    return _from_epoch(millis, "timestamp (ms)", milliseconds=millis).isoformat(" ", "microseconds")


def _nano_timestamp(nanos: int) -> str:
    seconds, fraction = divmod(nanos, 1_000_000_000)
    moment = _from_epoch(nanos, "timestamp (ns)", seconds=seconds)
    return f"{moment.isoformat(' ', 'seconds')}.{fraction:09d}"


def _zoned_timestamp(text: str) -> str:
    if text in ZONED_INFINITY:
        return ZONED_INFINITY[text]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UnconvertibleValue(
            f"timestamptz {text!r} is not a storable ISO-8601 instant"
        ) from None
    if parsed.tzinfo is None:
        raise UnconvertibleValue(f"timestamptz {text!r} has no UTC offset")
    moment = parsed.astimezone(UTC).replace(tzinfo=None)
    return _in_range(moment, text, "timestamptz").isoformat(" ", "microseconds")


def _time(micros: int) -> str:
    """Postgres' text form: fractional seconds without trailing zeros, none when zero."""
    seconds, fraction = divmod(micros, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return text + (f".{fraction:06d}".rstrip("0") if fraction else "")


# --- the table -----------------------------------------------------------------------------


def _decimal(avro: dict[str, Any]) -> ColumnType:
    params = avro.get("connect.parameters") or {}
    scale = int(params.get("scale", avro.get("scale", 0)))
    # Confluent writes Avro precision 64 when Connect has none (money); trust only its parameter.
    precision = params.get("connect.decimal.precision", None if params else avro.get("precision"))
    if scale < 0:
        raise UnsupportedType(f"decimal with negative scale {scale} ({avro!r})")
    digits = max(MONEY_PRECISION if precision is None else int(precision), scale)
    if digits > DECIMAL_MAX_DIGITS:
        return _type("String", _decimal_text, avro_sql=None)
    return _type(f"Decimal({digits}, {scale})", _decimal_text)


def _type(
    clickhouse: str,
    to_clickhouse: Callable[[Any], Any] = _same,
    avro_sql: str | None = "{}",
    avro_check: str | None = None,
) -> ColumnType:
    return ColumnType(clickhouse, to_clickhouse, None, avro_sql, avro_check)


def _epoch_range(unit_per_second: int) -> str:
    """Avro check: an epoch count in this unit lies in ClickHouse's 1900..2299 range."""
    low = int((MIN_DATETIME - EPOCH).total_seconds()) * unit_per_second
    high = int((MAX_DATETIME - EPOCH).total_seconds()) * unit_per_second
    return f"({{0}} >= {low} AND {{0}} < {high})"


DATE_DAYS_RANGE = (
    f"({{0}} BETWEEN {(MIN_DATETIME - EPOCH).days} AND {(MAX_DATETIME - EPOCH).days - 1})"
)


def _infinities_sql(
    avro_sql: str, check: str, infinity: dict[Any, str], stored_sql: str
) -> dict[str, str]:
    """`avro_sql` and `avro_check` of a type with `INFINITY` values: the two encoded values map
    to their stored values (`stored_sql` makes the literal of the column type, `{}` the text) and
    pass the check; every other value goes through `avro_sql`, which sees a harmless finite
    value in their place (ClickHouse may evaluate every branch of an `if`, and the encoded
    infinities are out of its functions' range)."""
    cases = ", ".join(
        f"{{0}} = {_sql_literal(encoded)}, {stored_sql.format(_quote(stored))}"
        for encoded, stored in infinity.items()
    )
    encoded = ", ".join(_sql_literal(e) for e in infinity)
    finite = f"if({{0}} IN ({encoded}), {_sql_literal(_finite_stand_in(infinity))}, {{0}})"
    return {
        "avro_sql": f"multiIf({cases}, {avro_sql.format(finite)})",
        "avro_check": f"({{0}} IN ({encoded}) OR {check})",
    }


def _finite_stand_in(infinity: dict[Any, str]) -> Any:
    """A value of the same Avro type as the encoded infinities that every SQL form accepts."""
    return "1970-01-01T00:00:00Z" if isinstance(next(iter(infinity)), str) else 0


def _sql_literal(value: Any) -> str:
    return _quote(value) if isinstance(value, str) else str(value)


def _quote(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


STRING = _type("String")
INSTANT_SQL = "toDateTime64({}, 6, 'UTC')"

# key (connect.name, logicalType, connect.type or Avro type) → ColumnType, or a factory taking the
# Avro type dict when the ClickHouse type depends on its parameters.
RULES: dict[str, ColumnType | Callable[[dict[str, Any]], ColumnType]] = {
    "int8": _type("Int8"),
    "int16": _type("Int16"),  # smallint
    "int": _type("Int32"),
    "long": _type("Int64"),
    "float": _type("Float32", _float),
    "double": _type("Float64", _float),
    "boolean": _type("Bool"),
    "string": STRING,  # text, varchar, char, inet, cidr, macaddr, ranges, ...
    # bytea; ClickHouse's Avro reader gives the raw bytes, stored as they are.
    "bytes": ColumnType("String", _hex, "unhex({})", clickhouse_output_expr="hex({})"),
    "decimal": _decimal,
    "org.apache.kafka.connect.data.Decimal": _decimal,  # numeric(p,s), money
    "io.debezium.data.VariableScaleDecimal": _type(
        "String", _variable_scale_decimal, avro_sql=None
    ),
    "io.debezium.time.Date": _type(
        "Date32",
        _date,
        **_infinities_sql(
            "addDays(toDate32('1970-01-01'), {})", DATE_DAYS_RANGE, DATE_INFINITY, "toDate32({})"
        ),
    ),
    "io.debezium.time.Timestamp": _type(
        "DateTime64(6, 'UTC')",
        _milli_timestamp,
        **_infinities_sql(
            "fromUnixTimestamp64Milli({}, 'UTC')", _epoch_range(1_000), MILLI_INFINITY, INSTANT_SQL
        ),
    ),
    "io.debezium.time.MicroTimestamp": _type(
        "DateTime64(6, 'UTC')",
        _micro_timestamp,
        **_infinities_sql(
            "fromUnixTimestamp64Micro({}, 'UTC')",
            _epoch_range(1_000_000),
            MICRO_INFINITY,
            INSTANT_SQL,
        ),
    ),
    "io.debezium.time.NanoTimestamp": _type(
        "DateTime64(9, 'UTC')",
        _nano_timestamp,
        "fromUnixTimestamp64Nano({}, 'UTC')",
        _epoch_range(1_000_000_000),
    ),
    # Debezium writes UTC instants as `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`; anything else (another
    # offset, a year outside 1900..2299) goes through the per-message path.
    "io.debezium.time.ZonedTimestamp": _type(
        "DateTime64(6, 'UTC')",
        _zoned_timestamp,
        **_infinities_sql(
            # ...OrNull: ClickHouse runs a function on the placeholder '' beneath a NULL too.
            "parseDateTime64BestEffortOrNull({}, 6, 'UTC')",
            "(isNull({0}) OR (match({0}, '^(19|2[0-2])[0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9:.]+Z$')"
            " AND isNotNull(parseDateTime64BestEffortOrNull({0}, 6, 'UTC'))))",
            ZONED_INFINITY,
            INSTANT_SQL,
        ),
    ),
    "io.debezium.time.MicroTime": _type("String", _time, avro_sql=None),
    "io.debezium.time.ZonedTime": STRING,  # timetz, as Debezium sends it
    "io.debezium.time.Interval": STRING,  # ISO-8601 duration, as sent
    "io.debezium.data.Uuid": _type("UUID"),
    "io.debezium.data.Json": STRING,  # json, jsonb, hstore
    "io.debezium.data.Xml": STRING,
    "io.debezium.data.Ltree": STRING,
    "io.debezium.data.Enum": _type("LowCardinality(String)"),
}


# --- resolution ----------------------------------------------------------------------------


def _nullable(inner: ColumnType) -> ColumnType:
    convert = inner.to_clickhouse
    if inner.clickhouse.startswith("Array("):
        return replace(inner, to_clickhouse=lambda v: [] if v is None else convert(v))
    if inner.clickhouse.startswith("LowCardinality("):  # LowCardinality(Nullable(T)), not reverse
        clickhouse = inner.clickhouse.replace("(", "(Nullable(", 1) + ")"
    else:
        clickhouse = f"Nullable({inner.clickhouse})"
    # The SQL forms need no change: ClickHouse functions pass NULL through.
    return replace(
        inner, clickhouse=clickhouse, to_clickhouse=lambda v: None if v is None else convert(v)
    )


def _array(items: ColumnType) -> ColumnType:
    convert, expr = items.to_clickhouse, items.clickhouse_input_expr
    output = items.clickhouse_output_expr
    return ColumnType(
        f"Array({items.clickhouse})",
        lambda v: [convert(x) for x in v],
        None if expr is None else f"arrayMap(x -> {expr.format('x')}, {{}})",
        avro_sql=None,  # NULL elements and conversions inside arrays: the per-message path
        clickhouse_output_expr=None
        if output is None
        else f"arrayMap(x -> {output.format('x')}, {{}})",
    )


def _rule_key(avro: dict[str, Any]) -> str:
    for prop in ("connect.name", "logicalType", "connect.type"):
        if prop in avro:
            return str(avro[prop])
    name, namespace = avro.get("name"), avro.get("namespace")
    if avro["type"] in ("record", "enum", "fixed") and name:
        return name if "." in name or not namespace else f"{namespace}.{name}"
    return str(avro["type"])


def column_type(avro_type: Any) -> ColumnType:
    """The ClickHouse column type and value conversion for one Avro field type."""
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        if len(branches) != 1:
            raise UnsupportedType(f"only [null, T] unions are supported, got {avro_type!r}")
        inner = column_type(branches[0])
        return _nullable(inner) if len(avro_type) == 2 else inner
    if isinstance(avro_type, dict) and not isinstance(avro_type.get("type"), str):
        return column_type(avro_type.get("type"))  # a field dict, or {"type": {...}}
    if isinstance(avro_type, dict) and avro_type["type"] == "array":
        return _array(column_type(avro_type["items"]))
    key = _rule_key(avro_type) if isinstance(avro_type, dict) else str(avro_type)
    rule = RULES.get(key)
    if rule is None:
        raise UnsupportedType(
            f"no ClickHouse mapping for Debezium/Avro type {key!r} (field type {avro_type!r}); "
            "add a rule to schemas/type_map.py RULES"
        )
    return rule if isinstance(rule, ColumnType) else rule(avro_type)
