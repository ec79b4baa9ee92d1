"""Materialized read models: kept inside the replicas' batch commit, exact under every change.

Definitions are projector/read_models/definitions.py's (entities recomputed per key, aggregates fed signed
deltas of an entity's rows, both versioned together as a `Family`). This module keeps them.

For every batch of a source table, after its replica rows are written (same intent, same
tokens: the commit protocol of projector/commit/checkpoint.py, step 3), `ReadModelMaintainer.apply_batch`
will, for each family whose entity that table affects:

  1. find the affected keys: the entity's `affects` query over the replica rows the batch wrote
     (`_partition` and `_offset` in the batch's range; on a replay they are the very same rows,
     since the replica insert was deduplicated by its token);
  2. stage the entity rows of those keys: the stored ones with sign -1 (read with FINAL from the
     entity's own table), then their new state recomputed from the replicas with sign +1;
  3. insert each aggregate's signed deltas from the stage, one block per aggregate, under the
     batch's token for that table; before an aggregate's deltas, if it has indexes:
     a. stage its served rows of the groups the deltas touch: as they are (-1, read from the
        aggregate's table) and as they will be (+1, the same read with the deltas added),
     b. write each of its indexes from that stage (below);
  3c. write each of the entity's indexes from the entity stage of step 2;
  4. insert the new entity rows (and deletion markers for stored keys that are gone), one block,
     under the batch's token for the entity's table, with a version greater than any before.

Why that is exact (the argument in full is docs/read-models.md):
  - An aggregate always equals the sum of the contributions of the entity rows stored right now:
    it starts empty with an empty entity table, and every change of a stored entity row is
    preceded by a delta of exactly (new contribution - stored contribution).
  - Each insert is one block (`ONE_BLOCK`), so it lands whole or not at all, and a replay's insert
    with the same token is dropped. A crash between steps 3 and 4 leaves deltas whose entity rows
    are not written yet; the replay recomputes from the same stored rows and the same replicas
    (nothing else is applied in between: the runner replays an open intent before any other
    batch, `replay first`), so it drops the same deltas and writes the same rows.
  - Recomputing a key from the replicas is exact for any key, so a superset of affected keys is
    harmless, and `affects` only has to be complete.
  - An index (projector/read_models/definitions.py `IndexModel`) holds each row of its model at one position,
    its `order_by` (which includes the model's key). Writing an index from a stage: every +1 row
    at its position, and a deletion marker at the position of every -1 row that no +1 row
    occupies, all with a version greater than any before; so read with FINAL the index holds
    exactly the +1 rows and the untouched ones: the model's rows. An index is written from rows
    read out of the table it follows (the entity's table, the aggregate's table) *before* that
    table's own insert of the batch, so a replay after a crash in between reads the same stored
    rows and writes (or drops, by token) the same index rows.

A new or changed family version is built beside the serving one: its tables are maintained by
every batch from the moment they exist, and `backfill_step` recomputes all keys chunk by chunk
(each chunk an intent of its own, projection `read_model_backfill`), between batches on the same
thread. When the last chunk is done, the views `read_models.<name>` switch to the new tables in
one statement each and the old version's tables are dropped.

A rebuild (`projector rebuild`, projector/operations/requests.py) builds the same definition again, as a
version of its own (`<definition hash>r<request>`: its tables are new), the same way; before it
serves it is verified (its rows equal to its definition over the replicas: exact, since nothing
is applied between batches), and the version it replaces is kept, still maintained by every
batch, as `previous`: a rollback points the views back at it, exact at once, until it is
dropped (`--drop-old`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import DONE, INTENT, BatchRange, CheckpointStore
from projector.config import ProjectorConfig
from projector.errors import RebuildRefused, StatementRejected
from projector.read_models.definitions import (
    AggregateModel,
    Family,
    IndexModel,
    ReadModelDefinitions,
    family_from_json,
    family_to_json,
    load_definitions,
)

log = logging.getLogger("projector.read_models")

BACKFILL = "read_model_backfill"  # the checkpoint projection of backfill chunks
# Every maintenance insert is one block, so it is atomic and its token covers all of it.
ONE_BLOCK = (
    "min_insert_block_size_rows = 1000000000000, min_insert_block_size_bytes = 1000000000000000, "
    "max_insert_block_size = 1000000000000, max_insert_threads = 1"
)
BUILDING, SERVING, RETIRED, FAILED = "building", "serving", "retired", "failed"
# A rebuild's states: `built` (verified, not serving: `--no-swap`), `previous` (replaced by a
# rebuild, kept and maintained for a rollback). Both are maintained by every batch.
BUILT, PREVIOUS = "built", "previous"
MAINTAINED = (SERVING, BUILDING, BUILT, PREVIOUS)
REBUILD, NO_SWAP = "rebuild", "no-swap"  # a version's options
INTEGER_TYPES = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")


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
        return self.table(f"{self.family.entity.name}__stage")

    def aggregate_stage(self, aggregate: str) -> str:
        """An aggregate's served rows before and after one batch's deltas (step 3a)."""
        return self.table(f"{aggregate}__stage")

    def served_columns(self, model: str) -> list[str]:
        """The columns readers see of one of the family's models (an index's are its model's)."""
        family = self.family
        if model == family.entity.name:
            return self.columns
        aggregate = next(a for a in family.aggregates if a.name == model)
        return [c.name for c in aggregate.columns]

    @property
    def key_stage(self) -> str:
        """The keys of one recompute, computed once (its definition reads them several times)."""
        return self.table(f"{self.family.entity.name}__keys")

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


class ReadModelMaintainer:
    """Keeps every read-model family current, batch by batch, and builds new versions."""

    def __init__(
        self, ch: ClickHouse, definitions: ReadModelDefinitions, source_schema: str,
        replica_database: str, database: str, control_database: str,
        chunk_keys: int = 250_000,
    ) -> None:  # fmt: skip
        self.ch = ch
        self.definitions = definitions
        self.source_schema = source_schema
        self.chunk_keys = chunk_keys  # keys recomputed per backfill chunk
        self.replica_database = replica_database
        self.database = database
        self.state_table = f"{ident(control_database)}.read_model_versions"
        self.backfills = CheckpointStore(ch, control_database, BACKFILL)
        self.active: dict[str, list[FamilyVersion]] = {}  # family -> serving and/or building
        self._last_version = 0
        self._created = False

    # ---- set-up ------------------------------------------------------------------------------

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.database))
        self.backfills.create()  # and the control database
        self.ch.execute(
            topology.create_table(
                self.state_table,
                ["family String", "version String", "state LowCardinality(String)",
                 "chunks UInt32", "key_min Nullable(Int64)", "key_max Nullable(Int64)",
                 "build UInt64", "definition String", "error String", "seq UInt64", "recorded_at DateTime64(3) DEFAULT now64(3)",
                 "options String DEFAULT ''"],
                "ReplacingMergeTree", "seq", "(family, version)", deduplicate=False,
            )
        )  # fmt: skip
        # A deployment whose table predates rebuilds gains the column.
        self.ch.execute(
            topology.alter_table(
                self.state_table, "ADD COLUMN IF NOT EXISTS options String DEFAULT ''"
            )
        )
        self._created = True

    def ensure(self) -> list[str]:
        """Start every family whose sources all have replica tables; returns what it did."""
        if not self._created:
            self.create()
        pending = [f for f in self.definitions.families if f.name not in self.active]
        if not pending:
            return []
        existing = {
            r["name"]
            for r in self.ch.rows(
                f"SELECT name FROM system.tables WHERE database = {quote(self.replica_database)}"
            )
        }
        recorded = self._recorded_versions()
        done = []
        for family in pending:
            if not set(family.entity.sources) <= existing:
                continue
            mine = recorded.get(family.name, [])
            # This definition has a version unless the only ones are rebuilds not serving yet
            # (a failed version stays failed: a rebuild brings it back).
            current = next(
                (v for v in mine if v.family.version == family.version and v.state != RETIRED
                 and (not v.rebuild or v.state in (SERVING, PREVIOUS, BUILT))), None,
            )  # fmt: skip
            started = []
            if current is None:
                started = [self._start_version(family)]
                done.append(f"building {family.name} version {family.version} (backfilling)")
            # The serving version serves, and is kept current, until a new one is built; a
            # building version of an older definition is abandoned (retired at the next swap).
            active = [
                v for v in [*mine, *started]
                if v.state in (SERVING, BUILT, PREVIOUS)
                or (v.state == BUILDING and v.family.version == family.version)
            ]  # fmt: skip
            for version in active:
                version.columns = self._entity_columns(version)
            self.active[family.name] = active
        return done

    def _recorded_versions(self) -> dict[str, list[FamilyVersion]]:
        """Every recorded version, each with the definition it was built from."""
        found: dict[str, list[FamilyVersion]] = {}
        for row in self.ch.rows(
            f"SELECT family, version, state, chunks, key_min, key_max, build, definition, options "
            f"FROM {self.state_table} FINAL ORDER BY build"
        ):
            family = family_from_json(row["definition"])
            found.setdefault(row["family"], []).append(
                FamilyVersion(family, row["version"], self.database, row["state"],
                              int(row["chunks"]), _int(row["key_min"]), _int(row["key_max"]),
                              int(row["build"]), options=row["options"])
            )  # fmt: skip
        return found

    def _start_version(
        self, family: Family, name: str | None = None, options: str = ""
    ) -> FamilyVersion:
        """Create a version's tables (empty) and plan its backfill; `name` names its tables
        (default: the definition's hash)."""
        version = FamilyVersion(family, name or family.version, self.database, BUILDING,
                                build=time.time_ns(), options=options)  # fmt: skip
        self._drop(version)  # a retired version built again starts from empty tables
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
        types = dict(described)
        all_keys = entity.all_keys(self.replica_database)
        by = ident(entity.by)
        stats = self.ch.rows(
            f"SELECT count() AS n, toInt64(min({by})) AS lo, toInt64(max({by})) AS hi "
            f"FROM ({all_keys}) AS k"
            if _bare(types[entity.by]) in INTEGER_TYPES
            else f"SELECT count() AS n, NULL AS lo, NULL AS hi FROM ({all_keys}) AS k"
        )[0]
        version.chunks = max(1, math.ceil(int(stats["n"]) / self.chunk_keys))
        if int(stats["n"]):
            version.key_min, version.key_max = _int(stats["lo"]), _int(stats["hi"])
        self._record(version, BUILDING)
        log.info("read-model family %s version %s: %d keys to backfill in %d chunks",
                 family.name, version.version, int(stats["n"]), version.chunks)  # fmt: skip
        return version

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

    def _entity_columns(self, version: FamilyVersion) -> list[str]:
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

    def _record(self, version: FamilyVersion, state: str, error: str = "") -> None:
        version.state = state
        self.ch.execute(
            f"INSERT INTO {self.state_table} (family, version, state, chunks, key_min, key_max, "
            f"build, definition, error, seq, options) VALUES ({quote(version.family.name)}, "
            f"{quote(version.version)}, {quote(state)}, {version.chunks}, "
            f"{_sql_int(version.key_min)}, {_sql_int(version.key_max)}, {version.build}, "
            f"{quote(family_to_json(version.family))}, {quote(error[:2000])}, {time.time_ns()}, "
            f"{quote(version.options)})"
        )

    # ---- per batch ---------------------------------------------------------------------------

    def apply_batch(self, batch: BatchRange, schema: str, table: str) -> None:
        """Steps 1-4 above for the rows of source `schema`.`table` the batch wrote."""
        if schema != self.source_schema or not self.active:
            return
        changed = (
            f"SELECT * FROM {ident(self.replica_database)}.{ident(table)} "
            f"WHERE _partition = {batch.partition} AND _offset BETWEEN {batch.first} AND {batch.last}"
        )
        for versions in self.active.values():
            for version in versions:
                entity = version.family.entity
                if version.state not in MAINTAINED or table not in entity.affects:
                    continue
                keys = entity.affected_keys(table, self.replica_database, changed)  # 1.
                self._guarded(version, partial(self._recompute, version, keys, batch, "read_model"))

    def _guarded(self, version: FamilyVersion, work: Callable[[], None]) -> None:
        """A statement ClickHouse rejects (a value a definition cannot take) fails that family
        version, never the pipeline: it stops being maintained, status shows the error, and a
        rebuild brings it back. Unavailability is the caller's to retry."""
        try:
            work()
        except StatementRejected as exc:
            log.error("read model family %s version %s failed and is no longer maintained: %s",
                      version.family.name, version.version, exc)  # fmt: skip
            self._record(version, FAILED, str(exc))

    def _recompute(
        self, version: FamilyVersion, keys: str, batch: BatchRange, projection: str
    ) -> None:
        """Steps 2-4 for the keys `keys` selects, under the tokens of `batch`."""
        entity = version.family.entity
        columns = ", ".join(ident(c) for c in version.columns)
        stage, by = version.stage, ident(entity.by)
        self.ch.execute(f"TRUNCATE TABLE {version.key_stage}")
        self.ch.execute(f"INSERT INTO {version.key_stage} SELECT DISTINCT * FROM ({keys})")
        staged_keys = f"SELECT {by} FROM {version.key_stage}"
        self.ch.execute(f"TRUNCATE TABLE {stage}")
        # 2. the stored rows (-1) and their new state (+1)
        new_version = self._next_version()
        self.ch.execute(
            f"INSERT INTO {stage} ({columns}, _version, _sign) SELECT {columns}, _version, -1 "
            f"FROM {version.entity_table} FINAL WHERE {by} IN ({staged_keys}) UNION ALL "
            f"SELECT {columns}, {new_version}, 1 "
            f"FROM ({entity.select(self.replica_database, staged_keys)}) "
            "SETTINGS join_use_nulls = 1"
        )
        # 3. each aggregate's deltas, one block under its token; first its indexes (3a, 3b)
        for aggregate in version.family.aggregates:
            target = version.table(aggregate.name)
            indexes = version.family.indexes_of(aggregate.name)
            if indexes:
                self._stage_aggregate(version, aggregate)
                for index in indexes:
                    self._write_index(version, index, version.aggregate_stage(aggregate.name),
                                      new_version, batch, projection)  # fmt: skip
            self.ch.execute(
                f"INSERT INTO {target} SETTINGS insert_deduplication_token = "
                f"{quote(batch.token(projection, target))}, {ONE_BLOCK} {aggregate.deltas(stage)}"
            )
        # 3c. the entity's indexes
        for index in version.family.indexes_of(entity.name):
            self._write_index(version, index, stage, new_version, batch, projection)
        # 4. the new rows, and deletion markers for the stored keys that are gone
        key = ", ".join(ident(k) for k in entity.key)
        self.ch.execute(
            f"INSERT INTO {version.entity_table} ({columns}, _version, _is_deleted) "
            f"SETTINGS insert_deduplication_token = {quote(batch.token(projection, version.entity_table))}, "
            f"{ONE_BLOCK} "
            f"SELECT {columns}, _version, 0 FROM {stage} WHERE _sign = 1 UNION ALL "
            f"SELECT {columns}, {new_version}, 1 FROM {stage} WHERE _sign = -1 "
            f"AND ({key}) NOT IN (SELECT {key} FROM {stage} WHERE _sign = 1)"
        )

    def _stage_aggregate(self, version: FamilyVersion, aggregate: AggregateModel) -> None:
        """3a. The served rows of the groups this batch's deltas touch, before (-1) and after
        (+1) the deltas; read before the deltas are inserted (so a replay reads the same)."""
        table, target = version.table(aggregate.name), version.aggregate_stage(aggregate.name)
        deltas = aggregate.deltas(version.stage)
        stored = ", ".join(ident(c.stored) for c in aggregate.columns if c.kind != "derived")
        keys = ", ".join(ident(c.stored) for c in aggregate.group_by)
        touched = f"SELECT {stored} FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM ({deltas}))"
        before = aggregate.served(f"({touched})")
        after = aggregate.served(f"({touched} UNION ALL SELECT {stored} FROM ({deltas}))")
        columns = ", ".join(ident(c) for c in version.served_columns(aggregate.name))
        self.ch.execute(f"TRUNCATE TABLE {target}")
        self.ch.execute(
            f"INSERT INTO {target} ({columns}, _sign) SELECT {columns}, -1 FROM ({before}) "
            f"UNION ALL SELECT {columns}, 1 FROM ({after})"
        )

    def _write_index(
        self, version: FamilyVersion, index: IndexModel, stage: str, new_version: int,
        batch: BatchRange, projection: str,
    ) -> None:  # fmt: skip
        """An index from a stage of its model's rows: each +1 row at its position, and a deletion
        marker at each -1 row's position that no +1 row takes (one block, under its token)."""
        target = version.table(index.name)
        columns = ", ".join(ident(c) for c in version.served_columns(index.of))
        position = ", ".join(index.order_by)
        self.ch.execute(
            f"INSERT INTO {target} ({columns}, _version, _is_deleted) "
            f"SETTINGS insert_deduplication_token = {quote(batch.token(projection, target))}, "
            f"{ONE_BLOCK}, transform_null_in = 1 "
            f"SELECT {columns}, {new_version}, 0 FROM {stage} WHERE _sign = 1 UNION ALL "
            f"SELECT {columns}, {new_version}, 1 FROM {stage} WHERE _sign = -1 "
            f"AND ({position}) NOT IN (SELECT {position} FROM {stage} WHERE _sign = 1)"
        )

    def _next_version(self) -> int:
        """Entity row versions only grow (a clock step back must not make an old row win)."""
        if not self._last_version:
            found = 0
            for versions in self.active.values():
                for version in versions:
                    for row in self.ch.rows(
                        f"SELECT max(_version) AS v FROM {version.entity_table}"
                    ):
                        found = max(found, int(row["v"] or 0))
            self._last_version = found
        self._last_version = max(time.time_ns(), self._last_version + 1)
        return self._last_version

    def finish_open_backfill(self) -> list[str]:
        """A backfill chunk a crash left open is done again before any batch (replay first)."""
        lines = []
        for versions in self.active.values():
            for version in versions:
                if version.state != BUILDING:
                    continue
                checkpoint = self.backfills.load([(version.topic, 0)]).get((version.topic, 0))
                if checkpoint is not None and checkpoint.state == INTENT:
                    lines.append(self._backfill_chunk(version))
        return lines

    # ---- building a new version --------------------------------------------------------------

    @property
    def building(self) -> bool:
        return any(v.state == BUILDING for vs in self.active.values() for v in vs)

    def backfill_step(self) -> str | None:
        """Recompute the next chunk of one building version (its own intent, then done); swap
        it in when it was the last. Returns a line of progress, or None when nothing builds."""
        for versions in self.active.values():
            for version in versions:
                if version.state == BUILDING:
                    return self._backfill_chunk(version)
        return None

    def _backfill_chunk(self, version: FamilyVersion) -> str:
        checkpoint = self.backfills.load([(version.topic, 0)]).get((version.topic, 0))
        if checkpoint is None:
            chunk = 0
        else:
            chunk = checkpoint.last if checkpoint.state == INTENT else checkpoint.last + 1
        if chunk < version.chunks:
            batch = BatchRange(version.topic, 0, chunk, chunk)
            self.backfills.record(batch, INTENT)
            keys = version.chunk_keys(version.family.entity.all_keys(self.replica_database), chunk)
            self._guarded(version, partial(self._recompute, version, keys, batch, BACKFILL))
            if version.state == FAILED:
                return f"{version.family.name}: backfill failed"
            self.backfills.record(batch, DONE)
            chunk += 1
            if version.rebuild:  # one step's work per call: its verification comes next
                return f"{version.family.name} version {version.version}: {chunk}/{version.chunks} chunks"
        if chunk >= version.chunks and version.rebuild:
            # Verified a step at a time as well, between batches (ingestion waits one chunk's
            # check, never the whole model's): checkpoint chunks `chunks … 2·chunks-1` check the
            # entity's key chunks against the definition, chunk `2·chunks` the aggregates.
            step = chunk - version.chunks
            if step <= version.chunks:
                batch = BatchRange(version.topic, 0, chunk, chunk)
                self.backfills.record(batch, INTENT)
                drifted = self._verify(version, step)
                if drifted:
                    self._record(version, FAILED, f"verification: {drifted}")
                    return f"{version.family.name} version {version.version}: verification failed: {drifted}"
                self.backfills.record(batch, DONE)
                if step < version.chunks:
                    return (f"{version.family.name} version {version.version}: verified "
                            f"{step + 1}/{version.chunks} chunks")  # fmt: skip
            if NO_SWAP in version.options.split(","):
                self._record(version, BUILT)
                return f"{version.family.name} version {version.version}: built and verified, not serving (--no-swap)"
        if chunk >= version.chunks:
            self._swap(version)
            return f"{version.family.name} version {version.version}: built, now serving"
        return f"{version.family.name} version {version.version}: {chunk}/{version.chunks} chunks"

    def _verify(self, version: FamilyVersion, step: int) -> str:
        """One step of a built version's verification (called between batches: exact): step
        i < chunks compares the entity rows of key chunk i with the definition evaluated over
        the replicas for those keys; step `chunks` compares each aggregate with the aggregate
        evaluated over the entity rows (checked against the definition by the steps before, and
        kept by every batch since), and each index with its model's rows. The models that
        differ, with a row each, or "" when equal."""
        entity = version.family.entity
        columns = ", ".join(ident(c) for c in version.columns)
        if step < version.chunks:
            where = version.chunk_predicate(step)
            keys = f"SELECT {ident(entity.by)} FROM ({entity.all_keys(self.replica_database)}) AS k WHERE {where}"
            pairs = [(entity.name,
                      f"SELECT {columns} FROM {version.entity_table} FINAL WHERE {where}",
                      f"SELECT {columns} FROM ({entity.select(self.replica_database, keys)})")]  # fmt: skip
        else:
            rows = f"(SELECT {columns} FROM {version.entity_table} FINAL)"
            pairs = [(a.name, a.served(version.table(a.name)), a.evaluated(rows))
                     for a in version.family.aggregates]  # fmt: skip
            # an index holds its model's rows, no more, no less (the model checked above)
            model_rows = {entity.name: rows[1:-1]} | {
                a.name: a.served(version.table(a.name)) for a in version.family.aggregates
            }
            for index in version.family.indexes:
                served = ", ".join(ident(c) for c in version.served_columns(index.of))
                pairs.append((index.name, f"SELECT {served} FROM {version.table(index.name)} FINAL",
                              model_rows[index.of]))  # fmt: skip
        drifted = []
        for name, stored, defined in pairs:
            diff = self.ch.rows(
                f"SELECT * FROM (({stored}) EXCEPT ({defined})) UNION ALL "
                f"SELECT * FROM (({defined}) EXCEPT ({stored})) LIMIT 1 SETTINGS join_use_nulls = 1"
            )
            if diff:
                drifted.append(f"{name} differs (e.g. {diff[0]})")
        return "; ".join(drifted)

    def _swap(self, version: FamilyVersion) -> None:
        """Point every read model of the family at the new version, then retire the old one —
        or, when the new one is a rebuild, keep the serving one as `previous` (maintained) for a
        rollback. Each view switches in one statement: a reader sees the old version or the new,
        both complete."""
        family = version.family
        self._point_views(version)
        old = [v for v in self._recorded_versions().get(family.name, [])
               if v.version != version.version and v.state in (*MAINTAINED, FAILED)]  # fmt: skip
        self._record(version, SERVING)
        kept: list[FamilyVersion] = []
        for previous in old:
            if version.rebuild and previous.state == SERVING:
                self._record(previous, PREVIOUS)
                kept.extend(v for v in self.active.get(family.name, [])
                            if v.version == previous.version)  # fmt: skip
                for v in kept:
                    v.state = PREVIOUS
                continue
            self._record(previous, RETIRED)
            self._drop(previous)
        self.active[family.name] = [version, *kept]

    def _point_views(self, version: FamilyVersion) -> None:
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

    def _drop(self, version: FamilyVersion) -> None:
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

    # ---- rebuilds: projector/operations/requests.py asks, between batches ------------------------------

    def family_named(self, name: str) -> Family:
        """The family of a read model or family `name`."""
        for family in self.definitions.families:
            if name == family.name or name in {m.name for m in family.models}:
                return family
        raise RebuildRefused(
            f"no read model or family is named {name!r} (`projector read-models list` lists them)"
        )

    def start_rebuild(self, name: str, request: str, no_swap: bool = False) -> FamilyVersion:
        """Start building the family of `name` again, as version `<hash>r<request>`: the same
        request asked again (a crash before it was marked taken) finds the version it started."""
        family = self.family_named(name)
        versions = self.active.get(family.name)
        if not versions:
            raise RebuildRefused(
                f"{family.name} is not kept yet: its source tables have no replica tables yet"
            )
        label = f"{family.version}r{request}"
        existing = next((v for v in versions if v.version == label), None)
        if existing is not None:
            return existing
        building = [v for v in versions if v.state == BUILDING]
        if building:
            raise RebuildRefused(f"{family.name} is already building version "
                                 f"{building[0].version}: wait for it (`projector read-models list`)")  # fmt: skip
        options = ",".join([REBUILD, NO_SWAP] if no_swap else [REBUILD])
        version = self._start_version(family, label, options)
        version.columns = self._entity_columns(version)
        versions.append(version)
        return version

    def swap_built(self, name: str) -> str:
        """Serve the family's version a `--no-swap` rebuild left built."""
        family = self.family_named(name)
        built = [v for v in self.active.get(family.name, []) if v.state == BUILT]
        if not built:
            raise RebuildRefused(f"{family.name} has no built version waiting to serve "
                                 f"(`projector rebuild {name} --no-swap` builds one)")  # fmt: skip
        self._swap(built[-1])
        return f"{family.name} version {built[-1].version} serving"

    def rollback(self, name: str) -> str:
        """Serve the previous version again (kept current by every batch, so exact now); the
        version serving until now becomes the previous one (a second rollback goes forward)."""
        family = self.family_named(name)
        versions = self.active.get(family.name, [])
        previous = [v for v in versions if v.state == PREVIOUS]
        if not previous:
            raise RebuildRefused(f"{family.name} keeps no previous version (never rebuilt, or "
                                 "dropped with --drop-old)")  # fmt: skip
        back = previous[-1]
        self._point_views(back)
        for version in versions:
            if version.state == SERVING:
                self._record(version, PREVIOUS)
        self._record(back, SERVING)
        return f"{family.name} version {back.version} serving again"

    def drop_old(self, name: str) -> str:
        """Drop the previous version's tables (no rollback after this)."""
        family = self.family_named(name)
        versions = self.active.get(family.name, [])
        previous = [v for v in versions if v.state == PREVIOUS]
        if not previous:
            raise RebuildRefused(f"{family.name} keeps no previous version to drop")
        for version in previous:
            self._record(version, RETIRED)
            self._drop(version)
        self.active[family.name] = [v for v in versions if v.state != RETIRED]
        return f"{family.name}: dropped version {', '.join(v.version for v in previous)}"

    # ---- what ops and tests read ----

    def ensure_known(self) -> None:
        """Load the recorded versions to report on, creating nothing new."""
        if not self._created:
            self.create()
        for name, versions in self._recorded_versions().items():
            self.active[name] = [v for v in versions if v.state in MAINTAINED]
            for version in self.active[name]:
                version.columns = self._entity_columns(version)

    def versions(self) -> list[dict[str, Any]]:
        """Every recorded version but the retired ones: state, backfill progress, error."""
        found = []
        for row in self.ch.rows(
            f"SELECT family, version, state, chunks, build, definition, error, options "
            f"FROM {self.state_table} FINAL WHERE state != {quote(RETIRED)} ORDER BY family, build"
        ):
            family = family_from_json(row["definition"])
            topic = f"{row['family']}@{row['version']}@{row['build']}"
            checkpoint = self.backfills.load([(topic, 0)]).get((topic, 0))
            done = 0 if checkpoint is None else checkpoint.last + (checkpoint.state == DONE)
            chunks = int(row["chunks"])
            # A rebuild's steps: its chunks built, then verified, then its aggregates verified.
            steps = 2 * chunks + 1 if REBUILD in row["options"].split(",") else chunks
            backfill = f"{min(done, chunks)}/{chunks} chunks"
            if done > chunks:
                backfill += f", verified {min(done - chunks, chunks)}/{chunks}"
            found.append({
                "family": row["family"], "version": row["version"], "state": row["state"],
                "backfill": backfill, "models": [m.name for m in family.models],
                "error": row["error"], "options": row["options"], "chunks": chunks,
                "done_chunks": min(done, chunks), "steps": steps, "done_steps": min(done, steps),
            })  # fmt: skip
        return found

    def reconcile(self, limit: int = 10) -> dict[str, list[dict[str, Any]]]:
        """Each serving read model against its definition evaluated over the replicas now:
        per model, up to `limit` rows found on one side only (`_side` says which). Exact only
        while nothing is applied (the projector stopped, or called between batches)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for versions in self.active.values():
            for version in versions:
                if version.state != SERVING:
                    continue
                for name, stored, defined in self._reconcile_pairs(version):
                    diff = self.ch.rows(
                        f"SELECT 'read model only' AS _side, * FROM (({stored}) EXCEPT ({defined})) "
                        f"UNION ALL SELECT 'definition only' AS _side, * FROM "
                        f"(({defined}) EXCEPT ({stored})) LIMIT {int(limit)} "
                        "SETTINGS join_use_nulls = 1"
                    )
                    found[name] = diff
        return found

    def _reconcile_pairs(self, version: FamilyVersion) -> list[tuple[str, str, str]]:
        entity = version.family.entity
        columns = ", ".join(ident(c) for c in version.columns)
        defined_rows = entity.select(self.replica_database, entity.all_keys(self.replica_database))
        pairs = [(entity.name, f"SELECT {columns} FROM {version.entity_table} FINAL",
                  f"SELECT {columns} FROM ({defined_rows})")]  # fmt: skip
        for aggregate in version.family.aggregates:
            pairs.append((aggregate.name, aggregate.served(version.table(aggregate.name)),
                          aggregate.evaluated(f"({defined_rows})")))  # fmt: skip
        defined = dict((name, sql) for name, _, sql in pairs)
        for index in version.family.indexes:  # an index holds its model's rows, no more, no less
            served = ", ".join(ident(c) for c in version.served_columns(index.of))
            pairs.append((index.name, f"SELECT {served} FROM {version.table(index.name)} FINAL",
                          defined[index.of]))  # fmt: skip
        return pairs


def _bare(kind: str) -> str:
    for wrapper in ("Nullable(", "LowCardinality("):
        if kind.startswith(wrapper):
            kind = kind[len(wrapper) : -1]
    return kind


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _sql_int(value: int | None) -> str:
    return "NULL" if value is None else str(int(value))


def maintainer_for(config: ProjectorConfig, ch: ClickHouse) -> ReadModelMaintainer | None:
    """The read-model maintainer a projector (or a DLQ replay) runs with, or None when this
    process does not keep read models (`maintain_read_models = false`)."""
    if not config.maintain_read_models:
        return None
    return ReadModelMaintainer(
        ch, load_definitions(config.read_models_file), config.read_model_schema,
        replica_database=f"{config.replica_prefix}{config.read_model_schema}",
        database=config.read_model_database, control_database=config.control_database,
        chunk_keys=config.read_model_backfill_chunk_keys,
    )  # fmt: skip
