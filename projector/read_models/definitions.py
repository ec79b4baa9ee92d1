"""Declarative read models: what each one is, as SQL the projector runs to keep it.

Definitions live in `projector/read_models/read_models.toml` (validated here with pydantic; the file's header
explains every field). Two kinds:

- `EntityModel`: one row per key, recomputed from the replicas for the keys a batch touches.
- `AggregateModel`: one row per group, fed signed deltas of one entity's rows.
- `IndexModel`: the rows of an entity or an aggregate again, in a table sorted by another key
  (`order_by`), so a question that filters or ranks by that key reads a few granules in order
  instead of scanning and sorting the whole model.

An entity, the aggregates fed by it and the indexes of either form a `Family`: they are kept together, in the same batch
commit, and a change to any of their definitions builds the whole family anew (new tables, named
by the family's definition hash) while the previous version keeps serving. How the projector keeps
them, and why that is exact, is projector/read_models/maintenance.py and docs/read-models.md; this module only
turns definitions into SQL text.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from projector.errors import ConfigError

DEFINITIONS_FILE = Path(__file__).with_name("read_models.toml")
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
PLACEHOLDER = re.compile(r"\{(\w+)\}")


class ReadModelError(ConfigError):
    """A definition is invalid; the message names the file and the read model (a configuration
    error: it stops start-up, not a batch)."""


def _placeholders(sql: str) -> set[str]:
    return set(PLACEHOLDER.findall(sql))


def render(sql: str, tables: dict[str, str]) -> str:
    """`sql` with every `{name}` replaced by `tables[name]` (SQL text is not a format string:
    ClickHouse's own braces, e.g. in a map literal, would not survive `str.format`)."""
    return PLACEHOLDER.sub(lambda m: tables[m.group(1)], sql.strip())


class EntityModel(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(pattern=IDENTIFIER)
    description: str
    sources: list[str] = Field(min_length=1)
    key: list[str] = Field(min_length=1)
    recompute_by: str | None = None
    keys: str
    sql: str
    affects: dict[str, str]

    @model_validator(mode="after")
    def _consistent(self) -> EntityModel:
        for source in self.sources:
            if not re.match(IDENTIFIER, source):
                raise ValueError(f"source {source!r} is not a table name")
        known = set(self.sources)
        if "keys" not in _placeholders(self.sql):
            raise ValueError("sql must narrow its sources to {keys}")
        if not _placeholders(self.sql) - {"keys"} <= known:
            raise ValueError(
                f"sql reads {sorted(_placeholders(self.sql) - {'keys'} - known)}, not in sources"
            )
        if not _placeholders(self.keys) <= known:
            raise ValueError("keys reads a table that is not a source")
        if set(self.affects) != known:
            raise ValueError(
                f"affects must say, for every source {sorted(known)}, which keys its changes touch"
                f" (it covers {sorted(self.affects)})"
            )
        for source, sql in self.affects.items():
            if "changed" not in _placeholders(sql) or not _placeholders(sql) - {"changed"} <= known:
                raise ValueError(f"affects.{source} must read {{changed}} and sources only")
        if self.recompute_by is None:
            self.recompute_by = self.key[0]
        if self.recompute_by not in self.key:
            raise ValueError(f"recompute_by {self.recompute_by!r} must be one of the key columns")
        return self

    @property
    def by(self) -> str:
        assert self.recompute_by is not None  # set by the validator
        return self.recompute_by

    def select(self, replica_database: str, keys_sql: str) -> str:
        """The rows of the keys `keys_sql` selects, each source read with FINAL."""
        tables = {s: f"(SELECT * FROM `{replica_database}`.`{s}` FINAL)" for s in self.sources}
        return render(self.sql, tables | {"keys": f"({keys_sql})"})

    def all_keys(self, replica_database: str) -> str:
        tables = {s: f"(SELECT * FROM `{replica_database}`.`{s}` FINAL)" for s in self.sources}
        return render(self.keys, tables)

    def affected_keys(self, source: str, replica_database: str, changed_sql: str) -> str:
        """The keys a batch's rows of `source` (selected by `changed_sql`) touch."""
        tables = {s: f"`{replica_database}`.`{s}`" for s in self.sources}
        return render(self.affects[source], tables | {"changed": f"({changed_sql})"})


class AggregateColumn(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(pattern=IDENTIFIER)
    group_by: str | None = None
    sum: str | None = None
    latest: str | None = None
    derived: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> AggregateColumn:
        kinds = [k for k in ("group_by", "sum", "latest", "derived") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                f"column {self.name!r} needs exactly one of group_by, sum, latest, derived"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("group_by", "sum", "latest", "derived") if getattr(self, k))

    @property
    def expression(self) -> str:
        return str(getattr(self, self.kind))

    @property
    def stored(self) -> str:
        """The column's name in the aggregate's table (never the served name: `sum(orders) AS
        orders` would make ClickHouse see an aggregate inside an aggregate)."""
        return self.name if self.kind == "group_by" else f"_{self.kind}_{self.name}"


class AggregateModel(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(pattern=IDENTIFIER)
    description: str
    entity: str
    where: str = "1"
    columns: list[AggregateColumn] = Field(min_length=2)
    visible_when: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> AggregateModel:
        if not self.group_by:
            raise ValueError("an aggregate needs at least one group_by column")
        sums = [c for c in self.columns if c.kind == "sum"]
        if not sums:
            raise ValueError("an aggregate needs at least one sum column")
        if self.visible_when is None:
            self.visible_when = f"{sums[0].name} != 0"
        return self

    @property
    def group_by(self) -> list[AggregateColumn]:
        return [c for c in self.columns if c.kind == "group_by"]

    @property
    def key(self) -> list[str]:
        return [c.name for c in self.group_by]

    def deltas(self, stage: str) -> str:
        """Signed deltas of this aggregate from a stage of entity rows (`_sign` -1: the stored
        row replaced, +1: its new state; `_version` orders `latest`)."""
        parts = []
        for column in self.columns:
            if column.kind == "group_by":
                parts.append(f"{column.expression} AS {column.stored}")
            elif column.kind == "sum":
                parts.append(f"sum(_sign * ({column.expression})) AS {column.stored}")
            elif column.kind == "latest":
                parts.append(
                    f"argMaxStateIf({column.expression}, _version, _sign > 0) AS {column.stored}"
                )
        keys = ", ".join(c.stored for c in self.group_by)
        return (
            f"SELECT {', '.join(parts)} FROM {stage} WHERE {self.where} "
            f"GROUP BY {keys} ORDER BY {keys}"
        )

    def served(self, table: str) -> str:
        """The read model as readers see it: the final merge of the deltas over its key."""
        parts = []
        for column in self.columns:
            if column.kind == "group_by":
                parts.append(column.name)
            elif column.kind == "sum":
                parts.append(f"sum({column.stored}) AS {column.name}")
            elif column.kind == "latest":
                parts.append(f"argMaxMerge({column.stored}) AS {column.name}")
            else:
                parts.append(f"{column.expression} AS {column.name}")
        keys = ", ".join(self.key)
        return f"SELECT {', '.join(parts)} FROM {table} GROUP BY {keys} HAVING {self.visible_when}"

    def evaluated(self, entity_rows: str) -> str:
        """The aggregate computed straight from entity rows (the reconcile check's side): no
        signs, no versions; `latest` is any row's value (the entity rows of one group agree on
        it when they are current)."""
        parts = []
        for column in self.columns:
            expression = column.expression
            if column.kind == "group_by":
                parts.append(f"{expression} AS {column.name}")
            elif column.kind == "sum":
                parts.append(f"sum(toInt8(1) * ({expression})) AS {column.stored}")
            elif column.kind == "latest":
                parts.append(f"any({expression}) AS {column.stored}")
        served = []
        for column in self.columns:
            if column.kind in ("sum", "latest"):
                served.append(f"{column.stored} AS {column.name}")
            elif column.kind == "derived":
                served.append(f"{column.expression} AS {column.name}")
            else:
                served.append(column.name)
        keys = ", ".join(self.key)
        return (
            f"SELECT {', '.join(served)} FROM (SELECT {', '.join(parts)} FROM {entity_rows} "
            f"WHERE {self.where} GROUP BY {keys}) WHERE {self.visible_when}"
        )


@dataclass(frozen=True)
class Family:
    """An entity and the aggregates fed by it: kept, versioned and rebuilt together."""

    entity: EntityModel
    aggregates: tuple[AggregateModel, ...]
    indexes: tuple[IndexModel, ...] = ()

    @property
    def name(self) -> str:
        return self.entity.name

    @property
    def version(self) -> str:
        """A short hash of the family's definitions: a changed definition is a new version."""
        parts: list[Any] = [self.entity.model_dump(), [a.model_dump() for a in self.aggregates]]
        if self.indexes:  # a family without indexes keeps the version it had before they existed
            parts.append([i.model_dump() for i in self.indexes])
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def models(self) -> list[EntityModel | AggregateModel | IndexModel]:
        return [self.entity, *self.aggregates, *self.indexes]

    def indexes_of(self, model: str) -> list[IndexModel]:
        return [i for i in self.indexes if i.of == model]

    def indexed(self, index: IndexModel) -> EntityModel | AggregateModel:
        """The model an index sorts anew."""
        models: list[EntityModel | AggregateModel] = [self.entity, *self.aggregates]
        return next(m for m in models if m.name == index.of)


def family_to_json(family: Family) -> str:
    """A family's definitions as text, kept with each built version (so the version serving
    while its successor builds is maintained by the definition it was built from)."""
    return json.dumps(
        {
            "entity": family.entity.model_dump(),
            "aggregates": [a.model_dump() for a in family.aggregates],
            "indexes": [i.model_dump() for i in family.indexes],
        },
        sort_keys=True,
    )


def family_from_json(text: str) -> Family:
    data = json.loads(text)
    return Family(
        EntityModel.model_validate(data["entity"]),
        tuple(AggregateModel.model_validate(a) for a in data["aggregates"]),
        tuple(IndexModel.model_validate(i) for i in data.get("indexes", [])),
    )


class IndexModel(BaseModel):
    """A read model's rows sorted by another key. The table is a ReplacingMergeTree whose sorting
    key is `order_by` (which ends with the model's key columns, so each model row has one
    position); the projector writes a model row's new state at its new position and a deletion
    marker at its old one whenever the row moves, so read with FINAL it holds exactly the
    model's rows (projector/read_models/maintenance.py, step 3b)."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=IDENTIFIER)
    description: str
    of: str = Field(pattern=IDENTIFIER)  # an entity or an aggregate of the same file
    order_by: list[str] = Field(min_length=1)  # expressions over the model's columns
    # Small granules: a FINAL read in order stops after a granule or two of each part (right
    # after a backfill an index has dozens of parts that all overlap at its newest end).
    granularity: int = Field(default=128, ge=64, le=65536)

    def check_covers(self, key: list[str]) -> None:
        missing = [k for k in key if k not in self.order_by]
        if missing:
            raise ValueError(
                f"index {self.name}: order_by must contain the key of {self.of} ({missing} "
                "missing), so that each of its rows has exactly one position"
            )


class ReadModel(BaseModel):
    """What every read model offers readers and watermarks: a name, a description, the replica
    tables it follows and the key its rows are unique by."""

    name: str
    description: str
    sources: list[str]
    key: list[str]
    kind: str


@dataclass(frozen=True)
class ReadModelDefinitions:
    families: tuple[Family, ...]

    @property
    def models(self) -> list[ReadModel]:
        found = []
        for family in self.families:
            entity = family.entity
            found.append(
                ReadModel(
                    name=entity.name,
                    description=entity.description,
                    sources=entity.sources,
                    key=entity.key,
                    kind="entity",
                )
            )
            for aggregate in family.aggregates:
                found.append(
                    ReadModel(
                        name=aggregate.name,
                        description=aggregate.description,
                        sources=entity.sources,
                        key=aggregate.key,
                        kind="aggregate",
                    )
                )
            for index in family.indexes:
                found.append(
                    ReadModel(
                        name=index.name,
                        description=index.description,
                        sources=entity.sources,
                        key=family.indexed(index).key,
                        kind="index",
                    )
                )
        return found


class _File(BaseModel):
    model_config = {"extra": "forbid"}

    entity: list[EntityModel] = Field(default_factory=list)
    aggregate: list[AggregateModel] = Field(default_factory=list)
    index: list[IndexModel] = Field(default_factory=list)


def load_definitions(path: Path | None = None) -> ReadModelDefinitions:
    path = DEFINITIONS_FILE if path is None else path
    try:
        parsed = _File.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ReadModelError(f"read-model file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ReadModelError(f"read-model file {path} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ReadModelError(f"read-model file {path}: {exc}") from exc
    names = (
        [e.name for e in parsed.entity]
        + [a.name for a in parsed.aggregate]
        + [i.name for i in parsed.index]
    )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ReadModelError(f"read-model file {path}: {', '.join(duplicates)} defined twice")
    entities = {e.name for e in parsed.entity}
    for aggregate in parsed.aggregate:
        if aggregate.entity not in entities:
            raise ReadModelError(
                f"read-model file {path}: aggregate {aggregate.name} is fed by {aggregate.entity!r},"
                f" which is not an [[entity]] (known: {', '.join(sorted(entities)) or 'none'})"
            )
    families = []
    for e in parsed.entity:
        aggregates = tuple(a for a in parsed.aggregate if a.entity == e.name)
        indexed: dict[str, EntityModel | AggregateModel] = {e.name: e}
        indexed |= {a.name: a for a in aggregates}
        indexes = tuple(i for i in parsed.index if i.of in indexed)
        for index in indexes:
            try:
                index.check_covers(indexed[index.of].key)
            except ValueError as exc:
                raise ReadModelError(f"read-model file {path}: {exc}") from exc
        families.append(Family(e, aggregates, indexes))
    known = {e.name for e in parsed.entity} | {a.name for a in parsed.aggregate}
    for index in parsed.index:
        if index.of not in known:
            raise ReadModelError(
                f"read-model file {path}: index {index.name} sorts {index.of!r}, which is not an "
                f"[[entity]] or [[aggregate]] (known: {', '.join(sorted(known)) or 'none'})"
            )
    return ReadModelDefinitions(tuple(families))


def load_read_models(path: Path | None = None) -> list[ReadModel]:
    """Every read model, entity or aggregate, as readers and watermarks see it."""
    return load_definitions(path).models
