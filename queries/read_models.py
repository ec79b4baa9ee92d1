"""Declarative read models: a name, its source tables and a ClickHouse SELECT over them.

Definitions live in `queries/read_models.toml` (validated here with pydantic). Each becomes a
ClickHouse view in the read-model database whose source placeholders (`{orders}`) are rendered as
`<replica database>.<table> FINAL`. Why views over the replicas rather than incrementally
maintained tables: a replica equals its Postgres table after every applied batch (the projector's
exactness argument, docs/projector.md), so a query over replicas read with FINAL is exact under
updates, deletes, re-inserts and crashes by construction — there is no second state to keep
right, and no row version is ever counted twice. The cost is paid at query time; docs/read-models.md
says when to materialise instead.

A read model is created once all its sources have replica tables (`ReadModels.ensure`, called by
the projector after each round of batches); `replace` re-creates it after a definition changed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

DEFINITIONS_FILE = Path(__file__).with_name("read_models.toml")
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ReadModelError(ValueError):
    """A definition is invalid; the message names the file and the read model."""


class ReadModel(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(pattern=IDENTIFIER)
    description: str
    sources: list[str] = Field(min_length=1)
    key: list[str] = Field(min_length=1)  # what makes a row unique (tests order and compare by it)
    sql: str

    @model_validator(mode="after")
    def _placeholders_match_sources(self) -> ReadModel:
        used = set(re.findall(r"\{(\w+)\}", self.sql))
        if used != set(self.sources):
            raise ValueError(
                f"placeholders {sorted(used)} in sql must be exactly the sources {sorted(self.sources)}"
            )
        for source in self.sources:
            if not re.match(IDENTIFIER, source):
                raise ValueError(f"source {source!r} is not a table name")
        return self

    def select(self, replica_database: str) -> str:
        """The SELECT with every source rendered as its replica table, read with FINAL."""
        tables = {s: f"(SELECT * FROM `{replica_database}`.`{s}` FINAL)" for s in self.sources}
        return self.sql.strip().format(**tables)


class _File(BaseModel):
    model_config = {"extra": "forbid"}

    read_model: list[ReadModel]


def load_read_models(path: Path | None = None) -> list[ReadModel]:
    path = DEFINITIONS_FILE if path is None else path
    try:
        parsed = _File.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ReadModelError(f"read-model file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ReadModelError(f"read-model file {path} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ReadModelError(f"read-model file {path}: {exc}") from exc
    names = [m.name for m in parsed.read_model]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ReadModelError(f"read-model file {path}: {', '.join(duplicates)} defined twice")
    return parsed.read_model


class ReadModels:
    """Creates the read-model views once their sources exist."""

    def __init__(
        self, ch: Any, models: list[ReadModel], replica_database: str, database: str
    ) -> None:
        self.ch = ch
        self.models = models
        self.replica_database = replica_database
        self.database = database
        self.created: set[str] = set()

    def ensure(self, replace: bool = False) -> list[str]:
        """Create every read model whose sources all exist; returns the names created now."""
        pending = [m for m in self.models if replace or m.name not in self.created]
        if not pending:
            return []
        existing = {
            r["name"]
            for r in self.ch.rows(
                f"SELECT name FROM system.tables WHERE database = '{self.replica_database}'"
            )
        }
        views = {
            r["name"]
            for r in self.ch.rows(
                f"SELECT name FROM system.tables WHERE database = '{self.database}'"
            )
        }
        made = []
        for model in pending:
            if not set(model.sources) <= existing:
                continue
            if model.name in views and not replace:
                self.created.add(model.name)
                continue
            self.ch.execute(self.ch.topology.create_database(self.database))
            self.ch.execute(
                self.ch.topology.create_or_replace_view(
                    f"`{self.database}`.`{model.name}`",
                    f"{model.select(self.replica_database)} SETTINGS join_use_nulls = 1",
                )
            )
            self.created.add(model.name)
            made.append(model.name)
        return made
