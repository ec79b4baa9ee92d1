"""A read-model version and its tables: what a version is (`FamilyVersion`: its family, state,
chunk plan and the names of its tables), and its tables created (empty) with their scratch
stages, described, pointed at by the read-model views, dropped.

What is written to them, batch by batch, is projector/read_models/maintenance.py's; when a version
is created, serves or is dropped, projector/read_models/versions.py's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from projector.clickhouse import ClickHouse, ident, quote
from projector.read_models.definitions import AggregateModel, Family, IndexModel

REBUILD, NO_SWAP = "rebuild", "no-swap"  # a version's options

# A recompute's scratch (maintenance.py): Memory tables of the process that holds the lease
# (named by its lease generation, so a stale holder's last statement never touches the new
# holder's), each filled in one block: ClickHouse deduplicates a token-ed INSERT ... SELECT by
# the blocks it reads, so a target insert replayed from a one-block Memory table is dropped
# whatever else changed, while one that reads MergeTree parts may not be. And one durable
# table, the entity stage (`stage`): each recompute's stored (-1) and recomputed (+1) entity
# rows, tagged with its range and inserted under the range's token, so a replay — by this
# process or the next holder — works from the rows the first attempt's deltas were made from,
# whatever the replicas did since. Partitioned by the lease generation the range was started
# under, so a holder empties its own generation's rows between ranges and older generations'
# once it has replayed their open range.
SCRATCH = ["_range String", "_generation UInt64"]


@dataclass
class FamilyVersion:
    """One version of a family: its tables, its state and, while building, its chunk plan."""

    family: Family
    version: str
    database: str
    state: str
    chunks: int = 1
    key_min: int | None = None  # integer keys are backfilled in ranges, others by hash
    key_max: int | None = None
    build: int = 0  # when this build started: names its backfill progress
    columns: list[str] = field(default_factory=list)  # the entity's columns
    options: str = ""  # comma-separated: REBUILD, NO_SWAP

    @property
    def rebuild(self) -> bool:
        return REBUILD in self.options.split(",")

    def table(self, name: str) -> str:
        return f"{ident(self.database)}.{ident(f'{name}__{self.version}')}"

    @property
    def entity_table(self) -> str:
        return self.table(self.family.entity.name)

    @property
    def stage(self) -> str:
        """The durable entity stage: each recompute's entity rows, tagged (`SCRATCH`)."""
        return self.table(f"{self.family.entity.name}__staged")

    def stage_memory(self, generation: int) -> str:
        """One recompute's entity stage, in one block (`SCRATCH`)."""
        return self.table(f"{self.family.entity.name}__stage_g{generation}")

    def aggregate_stage(self, aggregate: str, generation: int) -> str:
        """An aggregate's served rows before and after one recompute's deltas (step 3a)."""
        return self.table(f"{aggregate}__stage_g{generation}")

    def served_columns(self, model: str) -> list[str]:
        """The columns readers see of one of the family's models (an index's are its model's)."""
        family = self.family
        if model == family.entity.name:
            return self.columns
        aggregate = next(a for a in family.aggregates if a.name == model)
        return [c.name for c in aggregate.columns]

    def key_stage(self, generation: int) -> str:
        """The keys of one recompute, computed once (its definition reads them several times)."""
        return self.table(f"{self.family.entity.name}__keys_g{generation}")

    @property
    def topic(self) -> str:
        """The backfill's name in the checkpoint table."""
        return f"{self.family.name}@{self.version}@{self.build}"

    def chunk_keys(self, all_keys: str, chunk: int) -> str:
        by = ident(self.family.entity.by)
        if self.key_min is not None and self.key_max is not None:
            width = max(1, math.ceil((self.key_max - self.key_min + 1) / self.chunks))
            low = self.key_min + chunk * width
            high = self.key_max if chunk == self.chunks - 1 else low + width - 1
            return f"SELECT {by} FROM ({all_keys}) AS k WHERE {by} BETWEEN {low} AND {high}"
        return (
            f"SELECT {by} FROM ({all_keys}) AS k WHERE cityHash64({by}) % {self.chunks} = {chunk}"
        )

    def chunk_predicate(self, chunk: int) -> str:
        """The keys of verification chunk `chunk`, as a condition on the key column. Unlike
        `chunk_keys` (the backfill's, which needs only the keys there were when it began: every
        batch keeps the version from its creation) the chunks together cover every key value, so
        keys born since the plan, and rows of keys the definition no longer has, are checked."""
        by = ident(self.family.entity.by)
        if self.key_min is not None and self.key_max is not None:
            width = max(1, math.ceil((self.key_max - self.key_min + 1) / self.chunks))
            low, high = self.key_min + chunk * width, self.key_min + (chunk + 1) * width - 1
            bounds = ([] if chunk == 0 else [f"{by} >= {low}"]) + (
                [] if chunk == self.chunks - 1 else [f"{by} <= {high}"]
            )
            return " AND ".join(bounds) or "1"
        return f"cityHash64({by}) % {self.chunks} = {chunk}"


class VersionTables:
    """The tables of the versions in one read-model database."""

    def __init__(self, ch: ClickHouse, replica_database: str, database: str) -> None:
        """`replica_database`: where the definitions read from (their columns' types)."""
        self.ch = ch
        self.replica_database = replica_database
        self.database = database

    def create(self, version: FamilyVersion) -> list[tuple[str, str]]:
        """Create a version's tables, empty (its entity's, its aggregates', its indexes') and
        its scratch stages; returns the entity's columns (name, type)."""
        self.drop(version)  # a retired version built again starts from empty tables
        family = version.family
        entity = family.entity
        topology = self.ch.topology
        described = self._describe(entity.select(self.replica_database, "SELECT 0 WHERE 0"))
        columns = [f"{ident(n)} {t}" for n, t in described]
        key = ", ".join(ident(k) for k in entity.key)
        self.ch.execute(
            topology.create_table(
                version.entity_table,
                [*columns, "_version UInt64", "_is_deleted UInt8"],
                "ReplacingMergeTree",
                "_version, _is_deleted",
                f"({key})",
            )
        )
        self._create_scratch(version.stage, [*columns, "_version UInt64", "_sign Int8"])
        for aggregate in family.aggregates:
            self._create_aggregate_table(version, aggregate)
        for index in family.indexes:
            self._create_index_table(version, index, described)
        return described

    def _create_aggregate_table(self, version: FamilyVersion, aggregate: AggregateModel) -> None:
        described = dict(self._describe(aggregate.deltas(version.stage)))
        columns = []
        for column in aggregate.columns:
            if column.kind == "derived":
                continue
            kind = described[column.stored]
            if column.kind == "sum":
                kind = f"SimpleAggregateFunction(sum, {kind})"
            columns.append(f"{ident(column.stored)} {kind}")
        key = ", ".join(ident(c.stored) for c in aggregate.group_by)
        self.ch.execute(
            self.ch.topology.create_table(
                version.table(aggregate.name), columns, "AggregatingMergeTree", "", f"({key})"
            )
        )

    def _create_index_table(
        self, version: FamilyVersion, index: IndexModel, entity_columns: list[tuple[str, str]]
    ) -> None:
        """An index's table (the rows of its model, sorted by `order_by`) and, for an index of an
        aggregate, the aggregate's stage (step 3a)."""
        if index.of == version.family.entity.name:
            columns = entity_columns
        else:
            aggregate = next(a for a in version.family.aggregates if a.name == index.of)
            columns = self._describe(aggregate.served(version.table(aggregate.name)))
        self.ch.execute(
            self.ch.topology.create_table(
                version.table(index.name),
                [*(f"{ident(n)} {t}" for n, t in columns), "_version UInt64", "_is_deleted UInt8"],
                "ReplacingMergeTree",
                "_version, _is_deleted",
                f"({', '.join(index.order_by)})",
                settings=f"index_granularity = {index.granularity}, allow_nullable_key = 1",
            )
        )

    def _create_scratch(self, qualified: str, columns: list[str]) -> None:
        """The durable stage (`SCRATCH`): on a cluster replicated like every table, so whichever
        replica the next statement lands on reads what the last one wrote."""
        self.ch.execute(
            self.ch.topology.create_table(
                qualified,
                [*columns, *SCRATCH],
                "MergeTree",
                "",
                "_range",
                partition_by="_generation",
            )
        )

    def create_memory(self, version: FamilyVersion, generation: int) -> None:
        """The Memory scratch of the lease generation `generation` (`SCRATCH`): local to the
        server this process talks to, like the process itself."""
        family = version.family
        by = family.entity.by
        types = {r["name"]: r["type"] for r in self._columns(version.entity_table)}
        memory = "ENGINE = Memory"
        self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {version.key_stage(generation)} "
            f"({ident(by)} {types[by]}) {memory}"
        )
        stage = [f"{ident(n)} {t}" for n, t in types.items() if n != "_is_deleted"]
        self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {version.stage_memory(generation)} "
            f"({', '.join([*stage, '_sign Int8'])}) {memory}"
        )
        for aggregate in family.aggregates:
            if family.indexes_of(aggregate.name):
                served = self._describe(aggregate.served(version.table(aggregate.name)))
                spec = [*(f"{ident(n)} {t}" for n, t in served), "_sign Int8"]
                self.ch.execute(
                    f"CREATE TABLE IF NOT EXISTS {version.aggregate_stage(aggregate.name, generation)} "
                    f"({', '.join(spec)}) {memory}"
                )

    def drop_memory(self, generations: Callable[[int], bool]) -> None:
        """Drop the Memory scratch of the generations `generations` picks, of every version."""
        for row in self.ch.rows(
            f"SELECT name FROM system.tables WHERE database = {quote(self.database)} "
            "AND engine = 'Memory' AND match(name, '__(keys|stage)_g[0-9]+__')"
        ):
            found = re.search(r"__(?:keys|stage)_g([0-9]+)__", row["name"])
            if found and generations(int(found.group(1))):
                self.ch.execute(f"DROP TABLE IF EXISTS {ident(self.database)}.{ident(row['name'])}")

    def _columns(self, qualified: str) -> list[dict[str, str]]:
        table = qualified.replace("`", "").split(".", 1)[1]
        return self.ch.rows(
            f"SELECT name, type FROM system.columns WHERE database = {quote(self.database)} "
            f"AND table = {quote(table)} ORDER BY position"
        )

    def settled_keys(
        self, version: FamilyVersion, where: str, moving: dict[str, str] | None
    ) -> str:
        """`where` (a condition on the entity's key), but for the keys the replica rows that
        `moving` selects touch (beyond the stage's position: recomputed next, not yet)."""
        entity = version.family.entity
        changed = [
            entity.affected_keys(
                table,
                self.replica_database,
                f"SELECT * FROM {ident(self.replica_database)}.{ident(table)} WHERE {beyond}",
            )
            for table, beyond in (moving or {}).items()
            if table in entity.affects
        ]
        if not changed:
            return where
        unioned = " UNION ALL ".join(f"SELECT * FROM ({c})" for c in changed)
        return f"({where}) AND {ident(entity.by)} NOT IN ({unioned})"

    def _describe(self, select: str) -> list[tuple[str, str]]:
        rows = self.ch.rows(f"DESCRIBE ({select}) SETTINGS join_use_nulls = 1")
        return [(r["name"], r["type"]) for r in rows]

    def entity_columns(self, version: FamilyVersion) -> list[str]:
        """The entity table's columns; also makes sure the version's durable stage exists."""
        rows = self._columns(version.entity_table)
        stage = [f"{ident(r['name'])} {r['type']}" for r in rows if r["name"] != "_is_deleted"]
        if stage:
            self._create_scratch(version.stage, [*stage, "_sign Int8"])
        return [r["name"] for r in rows if r["name"] not in ("_version", "_is_deleted")]

    def point_views(self, version: FamilyVersion) -> None:
        family = version.family
        topology = self.ch.topology
        self.ch.execute(
            topology.create_or_replace_view(
                f"{ident(self.database)}.{ident(family.entity.name)}",
                f"SELECT {', '.join(ident(c) for c in version.columns)} "
                f"FROM {version.entity_table} FINAL",
            )
        )
        for aggregate in family.aggregates:
            self.ch.execute(
                topology.create_or_replace_view(
                    f"{ident(self.database)}.{ident(aggregate.name)}",
                    aggregate.served(version.table(aggregate.name)),
                )
            )
        for index in family.indexes:
            # Blocks of a granule, one thread: a FINAL read in order (a page, a top-N) then
            # stops after a granule or two of each part, instead of a default block (65,409
            # rows) of each, or the overlapping ranges split into layers for parallel threads.
            self.ch.execute(
                topology.create_or_replace_view(
                    f"{ident(self.database)}.{ident(index.name)}",
                    f"SELECT {', '.join(ident(c) for c in version.served_columns(index.of))} "
                    f"FROM {version.table(index.name)} FINAL "
                    f"SETTINGS max_block_size = {index.granularity}, max_threads = 1",
                )
            )

    def drop(self, version: FamilyVersion) -> None:
        """Drop every table of a version (found by its suffix: its aggregates may not be the
        current definition's)."""
        on_cluster = self.ch.topology.on_cluster()
        for row in self.ch.rows(
            f"SELECT name, engine FROM system.tables WHERE database = {quote(self.database)} "
            f"AND endsWith(name, {quote('__' + version.version)})"
        ):
            local = "" if row["engine"] == "Memory" else on_cluster  # an older version's scratch
            self.ch.execute(
                f"DROP TABLE IF EXISTS {ident(self.database)}.{ident(row['name'])}{local}"
            )
