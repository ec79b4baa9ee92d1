"""Named queries: SQL files in `queries/sql/` with typed, documented parameters.

A file is a ClickHouse SELECT over the read models (`read_models.<name>`), preceded by a header of
`--` comment lines holding TOML:

    -- description = "All orders of one customer, newest first."
    -- read_models = ["order_summary"]
    --
    -- [params.customer_id]
    -- description = "The customer's id (shop.customers.id)."
    -- minimum = 1
    SELECT ... WHERE customer_id = {customer_id:Int64} ORDER BY created_at DESC

Parameters appear in the SQL as ClickHouse query parameters, `{name:Type}`. Their values are
never put into the SQL text: the backend sends them apart (`ParameterisedClickHouse.query`) and
ClickHouse parses each as its declared type. Before that, a pydantic model built from the
declarations checks every value (type, bounds, choices, length), so a wrong value is refused with
a message naming the parameter, before ClickHouse sees it.

The placeholder's type is the one source of the parameter's type; `PARAMETER_TYPES` maps it to the
Python type pydantic checks and the text ClickHouse reads. The header adds what the SQL cannot say:
a description (required), a default, bounds, choices.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from projector.clickhouse import ParamValue
from queries.errors import InvalidParameters, QueryDefinitionError

SQL_DIR = Path(__file__).with_name("sql")
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([^{}]+)\}")
# Names the service itself reads from a query string: no named query may declare them.
RESERVED = frozenset({"limit", "offset", "min_lsn", "wait_ms", "format"})
MAX_TEXT_LENGTH = 1000  # a String parameter's default bound


@dataclass(frozen=True)
class ParameterType:
    """How a ClickHouse parameter type is checked (`python`, plus `bounds` for integers) and how
    a checked value is spelled for ClickHouse (`text`)."""

    python: type
    text: Callable[[Any], str]
    bounds: tuple[int, int] | None = None


def _integer(bits: int, signed: bool) -> ParameterType:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return ParameterType(int, str, (low, high))


# The table of parameter types a named query may declare (a placeholder of another type is refused
# when the file loads).
PARAMETER_TYPES: dict[str, ParameterType] = {
    "Int32": _integer(32, True),
    "Int64": _integer(64, True),
    "UInt8": _integer(8, False),
    "UInt16": _integer(16, False),
    "UInt32": _integer(32, False),
    "UInt64": _integer(64, False),
    "String": ParameterType(str, str),
    "Date": ParameterType(dt.date, lambda d: d.isoformat()),
    # Naive datetimes are UTC; aware ones are converted to it.
    "DateTime64(6, 'UTC')": ParameterType(
        dt.datetime,
        lambda t: (t.astimezone(dt.UTC) if t.tzinfo else t).strftime("%Y-%m-%d %H:%M:%S.%f"),
    ),
    "Decimal(18, 2)": ParameterType(Decimal, lambda d: format(d, "f")),
}


class ParameterSpec(BaseModel):
    """One parameter's header entry."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1)
    default: Any = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: list[str] | None = None
    max_length: int | None = Field(default=None, ge=1)


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1)
    read_models: list[str] = Field(min_length=1)
    params: dict[str, ParameterSpec] = Field(default_factory=dict)


@dataclass(frozen=True)
class Parameter:
    name: str
    clickhouse_type: str
    spec: ParameterSpec

    @property
    def required(self) -> bool:
        return self.spec.default is None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.clickhouse_type,
            "description": self.spec.description,
            "required": self.required,
        }
        for key in ("default", "minimum", "maximum", "choices", "max_length"):
            value = getattr(self.spec, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class NamedQuery:
    name: str
    description: str
    read_models: list[str]
    parameters: list[Parameter]
    sql: str
    model: type[BaseModel]  # checks a request's values (built from `parameters`)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "read_models": self.read_models,
            "parameters": [p.describe() for p in self.parameters],
        }

    def bind(self, raw: Mapping[str, str]) -> dict[str, ParamValue]:
        """Check raw values (query-string text) against the declarations; the checked values as
        ClickHouse parameter text. Unknown names and bad values raise `InvalidParameters`."""
        try:
            checked = self.model.model_validate(dict(raw))
        except ValidationError as exc:
            details = [
                {"parameter": ".".join(str(p) for p in e["loc"]) or "(all)", "problem": e["msg"]}
                for e in exc.errors()
            ]
            problems = "; ".join(f"{d['parameter']}: {d['problem']}" for d in details)
            raise InvalidParameters(
                f"query {self.name}: {problems}. Parameters: "
                + ", ".join(f"{p.name} ({p.clickhouse_type})" for p in self.parameters),
                details,
            ) from exc
        values = checked.model_dump()
        return {
            p.name: PARAMETER_TYPES[p.clickhouse_type].text(values[p.name]) for p in self.parameters
        }


def _header_and_sql(text: str) -> tuple[str, str]:
    lines = text.splitlines()
    header = []
    for index, line in enumerate(lines):
        if line.startswith("--"):
            header.append(line[3:] if line.startswith("-- ") else line[2:])
            continue
        return "\n".join(header), "\n".join(lines[index:]).strip()
    return "\n".join(header), ""


def _field(parameter: Parameter) -> tuple[Any, Any]:
    kind = PARAMETER_TYPES[parameter.clickhouse_type]
    spec = parameter.spec
    python: Any = kind.python
    if spec.choices is not None:
        python = Literal[tuple(spec.choices)]
    low: float | None = kind.bounds[0] if kind.bounds else None
    high: float | None = kind.bounds[1] if kind.bounds else None
    if spec.minimum is not None:
        low = spec.minimum if low is None else max(low, spec.minimum)
    if spec.maximum is not None:
        high = spec.maximum if high is None else min(high, spec.maximum)
    max_length = spec.max_length or (MAX_TEXT_LENGTH if kind.python is str else None)
    return python, Field(
        default=... if spec.default is None else spec.default,
        description=spec.description,
        ge=low,
        le=high,
        max_length=max_length if spec.choices is None else None,
    )


def parse_named_query(name: str, text: str, origin: str = "") -> NamedQuery:
    where = origin or name
    if not IDENTIFIER.match(name):
        raise QueryDefinitionError(f"{where}: a query name is lower-case letters, digits and _")
    header_text, sql = _header_and_sql(text)
    try:
        header = _Header.model_validate(tomllib.loads(header_text))
    except tomllib.TOMLDecodeError as exc:
        raise QueryDefinitionError(f"{where}: the -- header is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise QueryDefinitionError(f"{where}: {exc}") from exc
    if not sql:
        raise QueryDefinitionError(f"{where}: no SQL after the header")
    if ";" in sql.rstrip().rstrip(";"):
        raise QueryDefinitionError(f"{where}: one statement per file")
    types: dict[str, str] = {}
    for param, clickhouse_type in PLACEHOLDER.findall(sql):
        if types.setdefault(param, clickhouse_type) != clickhouse_type:
            raise QueryDefinitionError(
                f"{where}: {{{param}}} is used as {types[param]} and as {clickhouse_type}"
            )
        if clickhouse_type not in PARAMETER_TYPES:
            raise QueryDefinitionError(
                f"{where}: {{{param}:{clickhouse_type}}}: supported types are "
                + ", ".join(PARAMETER_TYPES)
            )
    if set(types) != set(header.params):
        raise QueryDefinitionError(
            f"{where}: placeholders {sorted(types)} and declared [params] "
            f"{sorted(header.params)} must be the same"
        )
    reserved = sorted(RESERVED & set(types))
    if reserved:
        raise QueryDefinitionError(f"{where}: {', '.join(reserved)} is reserved by the service")
    parameters = [Parameter(p, types[p], header.params[p]) for p in header.params]
    model = create_model(  # type: ignore[call-overload]
        f"{name}_parameters",
        __config__=ConfigDict(extra="forbid"),
        **{p.name: _field(p) for p in parameters},
    )
    query = NamedQuery(
        name, header.description, header.read_models, parameters, sql.rstrip().rstrip(";"), model
    )
    defaults = {p.name: p.spec.default for p in parameters if not p.required}
    if defaults:  # a default must pass its own parameter's checks
        try:
            query.bind(defaults | {p.name: _sample(p) for p in parameters if p.required})
        except InvalidParameters as exc:
            raise QueryDefinitionError(f"{where}: a default fails its checks: {exc}") from exc
    return query


def _sample(parameter: Parameter) -> Any:
    """A value that passes a required parameter's checks (to test the defaults alone)."""
    spec, kind = parameter.spec, PARAMETER_TYPES[parameter.clickhouse_type]
    if spec.choices:
        return spec.choices[0]
    samples: dict[type, Any] = {
        int: spec.minimum if spec.minimum is not None else 1,
        str: "x",
        dt.date: "2000-01-01",
        dt.datetime: "2000-01-01T00:00:00",
        Decimal: "1",
    }
    return samples[kind.python]


def load_named_queries(directory: Path | None = None) -> dict[str, NamedQuery]:
    """Every `*.sql` file of `directory` (default: the shipped `queries/sql/`), by file name."""
    directory = SQL_DIR if directory is None else directory
    if not directory.is_dir():
        raise QueryDefinitionError(f"named-query directory {directory} does not exist")
    queries = {}
    for path in sorted(directory.glob("*.sql")):
        query = parse_named_query(path.stem, path.read_text(), str(path))
        queries[query.name] = query
    return queries
