"""Declared upcasters: how a renamed or re-typed source column maps onto its replica column.

Schema changes that lose nothing need no declaration: an added column becomes `ALTER TABLE ... ADD
COLUMN`, a dropped one stays with its values and is NULL for rows written after, and a changed
type has the table re-read from Postgres (projector/replicas/catalog.py, `SchemaStep`). One change cannot
be inferred from the Avro schemas alone, because it looks like something else:

- a **rename** looks like a dropped column plus an added one (the values would move to a new
  replica column while the old one keeps only history).

Without a declaration the projector refuses it: the event goes to the dead-letter queue with a
reason that names the table, the column and this file. With one, it renames the replica column
(`ALTER TABLE ... RENAME COLUMN`) and maps every event, old and new versions alike, onto it; then
`projector dlq replay` applies what was refused before.

A declared **type** (`retypes`) converts the replica column in place (`MODIFY COLUMN`) instead of
re-reading the table: for a change whose cast is known to equal what Postgres stored.

The file is TOML (`schemas/upcasters.toml` by default, `PROJECTOR_UPCASTERS_FILE` to use another):

    [[upcaster]]
    table = "public.orders"                 # source schema.table
    renames = { customer = "customer_id" }  # old column name = new column name
    retypes = { qty = "Int64" }             # column = the ClickHouse type it converts to
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from schemas.errors import SchemaError

DEFAULT_FILE = Path(__file__).with_name("upcasters.toml")


class _Declaration(BaseModel):
    model_config = {"extra": "forbid"}

    table: str = Field(pattern=r"^[^.]+\.[^.]+$")
    renames: dict[str, str] = Field(default_factory=dict)
    retypes: dict[str, str] = Field(default_factory=dict)


class _File(BaseModel):
    model_config = {"extra": "forbid"}

    upcaster: list[_Declaration] = Field(default_factory=list)


@dataclass(frozen=True)
class Upcaster:
    """The declarations for one source table (empty: nothing declared)."""

    renames: dict[str, str] = field(default_factory=dict)
    retypes: dict[str, str] = field(default_factory=dict)

    def current_name(self, name: str) -> str:
        """The column's name now: an old name is mapped to the new one."""
        return self.renames.get(name, name)


NO_UPCASTER = Upcaster()


class Upcasters:
    def __init__(self, by_table: dict[tuple[str, str], Upcaster] | None = None) -> None:
        self.by_table = by_table or {}

    @classmethod
    def load(cls, path: Path | None = None) -> Upcasters:
        path = DEFAULT_FILE if path is None else path
        if not path.exists():
            if path == DEFAULT_FILE:
                return cls()
            raise SchemaError(f"upcasters file {path} does not exist")
        try:
            parsed = _File.model_validate(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise SchemaError(f"upcasters file {path} is not valid TOML: {exc}") from exc
        except ValidationError as exc:
            raise SchemaError(f"upcasters file {path}: {exc}") from exc
        by_table: dict[tuple[str, str], Upcaster] = {}
        for declaration in parsed.upcaster:
            schema, table = declaration.table.split(".")
            if (schema, table) in by_table:
                raise SchemaError(f"upcasters file {path}: {declaration.table} declared twice")
            by_table[(schema, table)] = Upcaster(declaration.renames, declaration.retypes)
        return cls(by_table)

    def for_table(self, schema: str, table: str) -> Upcaster:
        return self.by_table.get((schema, table), NO_UPCASTER)
