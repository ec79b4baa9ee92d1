"""A read-model version's tables: created (empty) with its scratch stages, described, pointed
at by the read-model views, dropped.

What is written to them, batch by batch, is projector/read_models/maintenance.py's; when a version
is created, serves or is dropped, projector/read_models/versions.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projector.clickhouse import ClickHouse, ident, quote
from projector.read_models.definitions import AggregateModel, IndexModel

if TYPE_CHECKING:
    from projector.read_models.versions import FamilyVersion


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
                version.entity_table, [*columns, "_version UInt64", "_is_deleted UInt8"],
                "ReplacingMergeTree", "_version, _is_deleted", f"({key})",
            )
        )  # fmt: skip
        # The stage is scratch for one recompute at a time: local to the server we talk to.
        self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {version.stage} "
            f"({', '.join([*columns, '_version UInt64', '_sign Int8'])}) ENGINE = Memory"
        )
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
            self._create_aggregate_stage(version, index.of, columns)
        self.ch.execute(
            self.ch.topology.create_table(
                version.table(index.name),
                [*(f"{ident(n)} {t}" for n, t in columns), "_version UInt64", "_is_deleted UInt8"],
                "ReplacingMergeTree", "_version, _is_deleted", f"({', '.join(index.order_by)})",
                settings=f"index_granularity = {index.granularity}, allow_nullable_key = 1",
            )
        )  # fmt: skip

    def _create_aggregate_stage(
        self, version: FamilyVersion, aggregate: str, columns: list[tuple[str, str]]
    ) -> None:
        # scratch of one recompute, like the entity's stage: local to the server we talk to
        spec = ", ".join([*(f"{ident(n)} {t}" for n, t in columns), "_sign Int8"])
        self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {version.aggregate_stage(aggregate)} ({spec}) "
            "ENGINE = Memory"
        )

    def _describe(self, select: str) -> list[tuple[str, str]]:
        rows = self.ch.rows(f"DESCRIBE ({select}) SETTINGS join_use_nulls = 1")
        return [(r["name"], r["type"]) for r in rows]

    def entity_columns(self, version: FamilyVersion) -> list[str]:
        """The entity table's columns; also makes sure the version's key stage exists."""
        table = version.entity_table.replace("`", "").split(".", 1)[1]
        rows = self.ch.rows(
            f"SELECT name, type FROM system.columns WHERE database = {quote(self.database)} "
            f"AND table = {quote(table)} ORDER BY position"
        )
        types = {r["name"]: r["type"] for r in rows}
        by = version.family.entity.by
        if by in types:  # scratch like the stage: local to the server we talk to
            self.ch.execute(
                f"CREATE TABLE IF NOT EXISTS {version.key_stage} ({ident(by)} {types[by]}) "
                "ENGINE = Memory"
            )
        for aggregate in version.family.aggregates:  # and the aggregates' stages (step 3a)
            if version.family.indexes_of(aggregate.name):
                self._create_aggregate_stage(
                    version, aggregate.name,
                    self._describe(aggregate.served(version.table(aggregate.name))),
                )  # fmt: skip
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
            local = "" if row["engine"] == "Memory" else on_cluster
            self.ch.execute(
                f"DROP TABLE IF EXISTS {ident(self.database)}.{ident(row['name'])}{local}"
            )
