"""Materialized read models: recomputed from the replicas, exact under every change.

Definitions are projector/read_models/definitions.py's (entities recomputed per key, aggregates fed signed
deltas of an entity's rows, both versioned together as a `Family`). This module keeps them.

For every range of a source table's replica the read models' stage recomputes (its own intent
and tokens: projector/read_models/stage.py), `ReadModelMaintainer.apply_range` will, for each
family whose entity that table affects:

  1. find the affected keys: the entity's `affects` query over the replica rows in the range
     (`_partition` and `_offset` in it);
  2. stage the entity rows of those keys: the stored ones with sign -1 (read with FINAL from the
     entity's own table), then their new state recomputed from the replicas with sign +1; and
     keep that stage under the range's token (a replay works from it, not from the replicas);
  3. insert each aggregate's signed deltas from the stage, one block per aggregate, under the
     range's token for that table; before an aggregate's deltas, if it has indexes:
     a. stage its served rows of the groups the deltas touch: as they are (-1, read from the
        aggregate's table) and as they will be (+1, the same read with the deltas added),
     b. write each of its indexes from that stage (below);
  3c. write each of the entity's indexes from the entity stage of step 2;
  4. insert the new entity rows (and deletion markers for stored keys that are gone), one block,
     under the range's token for the entity's table, with a version greater than any before.

Why that is exact (the argument in full is docs/read-models.md):
  - An aggregate always equals the sum of the contributions of the entity rows stored right now:
    it starts empty with an empty entity table, and every change of a stored entity row is
    preceded by a delta of exactly (new contribution - stored contribution).
  - Each insert is one block (`ONE_BLOCK`), so it lands whole or not at all, and reads a
    one-block Memory table (version_tables.py `SCRATCH`), so a replay's insert with the same
    token is dropped (ClickHouse deduplicates an INSERT ... SELECT by the blocks it reads). A
    crash between steps 3 and 4 leaves deltas whose entity rows are not written yet; the replay
    reads the kept stage (step 2), so it drops the same deltas and writes the rows they were
    made from, whatever the replicas did since; the stored rows are the same because the stage
    replays an open range before any other.
  - Recomputing a key from the replicas is exact for any key, so a superset of affected keys is
    harmless, and `affects` only has to be complete.
  - An index (projector/read_models/definitions.py `IndexModel`) holds each row of its model at one position,
    its `order_by` (which includes the model's key). Writing an index from a stage: every +1 row
    at its position, and a deletion marker at the position of every -1 row that no +1 row
    occupies, all with a version greater than any before; so read with FINAL the index holds
    exactly the +1 rows and the untouched ones: the model's rows. An index is written from rows
    read out of the table it follows (the entity's table, the aggregate's table) *before* that
    table's own insert of the range, so a replay after a crash in between reads the same stored
    rows and writes (or drops, by token) the same index rows.

A version being built (projector/read_models/versions.py: its states, when it serves) is kept
by every range from the moment its tables exist, and `backfill_step` recomputes all its keys
chunk by chunk the same way (steps 2-4, each chunk an intent of its own, projection
`read_model_backfill`), between ranges on the stage's thread; then a rebuild's version is
verified, a chunk at a time, and the version swapped in (or left built: `--no-swap`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import DONE, INTENT, BatchRange
from projector.config import ProjectorConfig
from projector.errors import raise_unless_refused
from projector.read_models.definitions import (
    AggregateModel,
    IndexModel,
    ReadModelDefinitions,
    load_definitions,
)
from projector.read_models.versions import (
    BACKFILL,
    BUILDING,
    BUILT,
    FAILED,
    MAINTAINED,
    NO_SWAP,
    FamilyVersion,
    FamilyVersions,
)

log = logging.getLogger("projector.read_models")

# Every maintenance insert is one block, so it is atomic and its token covers all of it.
ONE_BLOCK = (
    "min_insert_block_size_rows = 1000000000000, min_insert_block_size_bytes = 1000000000000000, "
    "max_insert_block_size = 1000000000000, max_insert_threads = 1"
)


class ReadModelMaintainer:
    """Keeps every maintained version current: each range's affected keys recomputed (steps 1-4
    above), and a building version's keys recomputed chunk by chunk (its backfill). Which
    versions there are, and their states, is `family_versions`' (versions.py).

    `active` is `family_versions`' dict of the versions the stage keeps."""

    def __init__(
        self,
        ch: ClickHouse,
        definitions: ReadModelDefinitions,
        source_schema: str,
        replica_database: str,
        database: str,
        control_database: str,
        chunk_keys: int = 250_000,
    ) -> None:
        self.ch = ch
        self.definitions = definitions
        self.source_schema = source_schema
        self.replica_database = replica_database
        self.database = database
        self.family_versions = FamilyVersions(
            ch, definitions, replica_database, database, control_database, chunk_keys
        )
        self.active = self.family_versions.active  # the same dict: the versions the stage keeps
        self.backfills = self.family_versions.backfills
        self._last_version = 0
        # The lease generation new work is done under (projector/read_models/stage.py sets it
        # when it takes the lease; a command in its own process, where no projector runs,
        # keeps 0): it names the scratch partition and orders the backfill's records.
        self.generation = 0
        # Per source table, the replica rows beyond the stage's position (a condition): keys
        # they touch are not verified yet (the stage recomputes them next). None: no stage.
        self.moving: Callable[[], dict[str, str]] = dict
        self._memory: set[tuple[str, int]] = set()  # (version, generation): scratch created

    # ---- per range ---------------------------------------------------------------------------

    def apply_range(
        self,
        batch: BatchRange,
        table: str,
        projection: str,
        generation: int,
        replay: bool = False,
    ) -> None:
        """Steps 1-4 above for the rows of source table `table` whose replica offsets are in
        `batch` (a range the stage recomputes: projector/read_models/stage.py), under tokens of
        `projection`, with the scratch of lease `generation`; `replay`: the range was started
        before (a crash, a hand-over) and is done again exactly."""
        changed = (
            f"SELECT * FROM {ident(self.replica_database)}.{ident(table)} "
            f"WHERE _partition = {batch.partition} AND _offset BETWEEN {batch.first} AND {batch.last}"
        )
        for versions in list(self.active.values()):
            for version in versions:
                entity = version.family.entity
                if version.state not in MAINTAINED or table not in entity.affects:
                    continue
                keys = entity.affected_keys(table, self.replica_database, changed)  # 1.
                recompute = partial(
                    self._recompute, version, keys, batch, projection, generation, replay
                )
                self._guarded(version, recompute)

    def key_chunks(self, table: str) -> int:
        """How many chunks every key of the maintained versions over `table` takes (at most
        `chunk_keys` keys each): what `apply_chunk` is planned with."""
        largest = 0
        for version in self._over(table):
            keys = self._every_key(version)
            (row,) = self.ch.rows(f"SELECT count() AS n FROM ({keys})")
            largest = max(largest, int(row["n"]))
        return max(1, math.ceil(largest / self.family_versions.chunk_keys))

    def apply_chunk(
        self,
        batch: BatchRange,
        table: str,
        chunk: tuple[int, int],
        generation: int,
        replay: bool = False,
    ) -> None:
        """Steps 1-4 for chunk `chunk` = (index, of how many) of every key of the maintained
        versions over `table` (its replica was replaced wholesale: projector/read_models/
        stage.py `request_every_key`): the keys the replicas have and the keys the read model
        holds, so a key gone from the replica is recomputed too (to nothing)."""
        index, chunks = chunk
        for version in self._over(table):
            by = ident(version.family.entity.by)
            keys = f"SELECT {by} FROM ({self._every_key(version)}) WHERE cityHash64({by}) % {chunks} = {index}"
            recompute = partial(
                self._recompute, version, keys, batch, batch.topic, generation, replay
            )
            self._guarded(version, recompute)

    def _over(self, table: str) -> list[FamilyVersion]:
        return [
            v
            for vs in list(self.active.values())
            for v in vs
            if v.state in MAINTAINED and table in v.family.entity.affects
        ]

    def _every_key(self, version: FamilyVersion) -> str:
        by = ident(version.family.entity.by)
        return (
            f"SELECT {by} FROM ({version.family.entity.all_keys(self.replica_database)}) "
            f"UNION DISTINCT SELECT {by} FROM {version.entity_table} FINAL"
        )

    def sources(self) -> set[str]:
        """The source tables the maintained versions read."""
        return {t for vs in self.active.values() for v in vs for t in v.family.entity.affects}

    def _guarded(self, version: FamilyVersion, work: Callable[[], None]) -> None:
        """A statement ClickHouse rejects (a value a definition cannot take) fails that family
        version, never the pipeline: it stops being maintained, status shows the error, and a
        rebuild brings it back. Unavailability (`raise_unless_refused` judges, as for a replica's
        rows: the server backend's errors come as StatementRejected, chDB's as its own) is the
        caller's to retry, and a lost lease the stage's."""
        try:
            work()
        except Exception as exc:
            raise_unless_refused(exc)
            log.error(
                "read model family %s version %s failed and is no longer maintained: %s",
                version.family.name,
                version.version,
                exc,
            )
            self.family_versions.record(version, FAILED, str(exc))

    def _recompute(
        self,
        version: FamilyVersion,
        keys: str,
        batch: BatchRange,
        projection: str,
        generation: int,
        replay: bool = False,
    ) -> None:
        """Steps 1-4 for the keys `keys` selects, under the tokens of `batch`; its scratch is
        lease generation `generation`'s (version_tables.py `SCRATCH`). Every token-ed insert
        reads a one-block Memory table, so a replay's is dropped when the first landed; and
        the entity stage is kept under the range's token, so a replay (`replay`) recomputes
        nothing: it works from the rows the first attempt's deltas were made from."""
        entity = version.family.entity
        columns = ", ".join(ident(c) for c in version.columns)
        by = ident(entity.by)
        if (version.version, generation) not in self._memory:
            self.family_versions.tables.create_memory(version, generation)
            self._memory.add((version.version, generation))
        keys_memory, stage = version.key_stage(generation), version.stage_memory(generation)
        self.ch.execute(f"TRUNCATE TABLE {keys_memory}")
        self.ch.execute(
            f"INSERT INTO {keys_memory} SETTINGS {ONE_BLOCK} SELECT DISTINCT * FROM ({keys})"
        )
        staged_keys = f"SELECT {by} FROM {keys_memory}"
        # 2. the stored rows (-1) and their new state (+1), kept under the range's token
        new_version = self._next_version()
        staged = f"{columns}, _version, _sign"
        self.ch.execute(f"TRUNCATE TABLE {stage}")
        self.ch.execute(
            f"INSERT INTO {stage} ({staged}) SETTINGS {ONE_BLOCK}, join_use_nulls = 1 "
            f"SELECT {columns}, _version, -1 FROM {version.entity_table} FINAL "
            f"WHERE {by} IN ({staged_keys}) UNION ALL SELECT {columns}, {new_version}, 1 "
            f"FROM ({entity.select(self.replica_database, staged_keys)})"
        )
        tag = batch.token(projection, "scratch")
        self.ch.execute(
            f"INSERT INTO {version.stage} ({staged}, _range, _generation) SETTINGS "
            f"insert_deduplication_token = {quote(batch.token(projection, version.stage))}, "
            f"{ONE_BLOCK} SELECT {staged}, {quote(tag)}, {int(generation)} FROM {stage}"
        )
        if replay:  # the stage that landed first is the one its deltas were made from
            self.ch.execute(f"TRUNCATE TABLE {stage}")
            self.ch.execute(
                f"INSERT INTO {stage} ({staged}) SETTINGS {ONE_BLOCK} SELECT {staged} "
                f"FROM {version.stage} WHERE _range = {quote(tag)} AND _generation = {int(generation)}"
            )
        # 3. each aggregate's deltas, one block under its token; first its indexes (3a, 3b)
        for aggregate in version.family.aggregates:
            target = version.table(aggregate.name)
            indexes = version.family.indexes_of(aggregate.name)
            if indexes:
                aggregate_stage = version.aggregate_stage(aggregate.name, generation)
                self._stage_aggregate(version, aggregate, stage, aggregate_stage)
                for index in indexes:
                    self._write_index(
                        version, index, aggregate_stage, new_version, batch, projection
                    )
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

    def _stage_aggregate(
        self, version: FamilyVersion, aggregate: AggregateModel, stage: str, target: str
    ) -> None:
        """3a. The served rows of the groups this recompute's deltas touch, before (-1) and
        after (+1) the deltas, in one block; read before the deltas are inserted (so a replay
        whose index writes did not land reads the same)."""
        table = version.table(aggregate.name)
        deltas = aggregate.deltas(stage)
        stored = ", ".join(ident(c.stored) for c in aggregate.columns if c.kind != "derived")
        keys = ", ".join(ident(c.stored) for c in aggregate.group_by)
        touched = f"SELECT {stored} FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM ({deltas}))"
        before = aggregate.served(f"({touched})")
        after = aggregate.served(f"({touched} UNION ALL SELECT {stored} FROM ({deltas}))")
        columns = ", ".join(ident(c) for c in version.served_columns(aggregate.name))
        self.ch.execute(f"TRUNCATE TABLE {target}")
        self.ch.execute(
            f"INSERT INTO {target} ({columns}, _sign) SETTINGS {ONE_BLOCK} "
            f"SELECT {columns}, -1 FROM ({before}) UNION ALL SELECT {columns}, 1 FROM ({after})"
        )

    def _write_index(
        self,
        version: FamilyVersion,
        index: IndexModel,
        stage: str,
        new_version: int,
        batch: BatchRange,
        projection: str,
    ) -> None:
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

    def drop_scratch(self, generations: Callable[[int], bool]) -> None:
        """Empty the durable stage's partitions, and drop the Memory scratch, of the lease
        generations `generations` picks (version_tables.py `SCRATCH`): call between ranges,
        never with one open."""
        for versions in self.active.values():
            for version in versions:
                database, name = (part.strip("`") for part in version.stage.split(".", 1))
                for row in self.ch.rows(
                    f"SELECT DISTINCT partition FROM system.parts WHERE active "
                    f"AND database = {quote(database)} AND table = {quote(name)}"
                ):
                    if generations(int(row["partition"])):
                        partition = int(row["partition"])
                        self.ch.execute(f"ALTER TABLE {version.stage} DROP PARTITION {partition}")
        self.family_versions.tables.drop_memory(generations)
        self._memory = {(v, g) for v, g in self._memory if not generations(g)}

    # ---- building a new version --------------------------------------------------------------

    @property
    def building(self) -> bool:
        return any(v.state == BUILDING for vs in self.active.values() for v in vs)

    def building_version(self) -> str:
        """The version the next backfill chunk builds (call while `building`)."""
        return next(v.version for vs in self.active.values() for v in vs if v.state == BUILDING)

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
        # Its records never rank below the last one (a command in its own process has no lease).
        recorded = max(self.generation, 0 if checkpoint is None else checkpoint.generation)
        generation = recorded  # the scratch partition: a replay finds it by the intent's
        if checkpoint is None:
            chunk = 0
        elif checkpoint.state == INTENT:  # replayed exactly: its scratch rows are that generation's
            chunk, generation = checkpoint.last, checkpoint.generation
        else:
            chunk = checkpoint.last + 1
        if chunk < version.chunks:
            batch = BatchRange(version.topic, 0, chunk, chunk)
            if checkpoint is None or checkpoint.state != INTENT:  # a replay's stays as it is
                self.backfills.record(batch, INTENT, recorded)
            keys = version.chunk_keys(version.family.entity.all_keys(self.replica_database), chunk)
            replay = checkpoint is not None and checkpoint.state == INTENT
            recompute = partial(self._recompute, version, keys, batch, BACKFILL, generation, replay)
            self._guarded(version, recompute)
            if version.state == FAILED:
                return f"{version.family.name}: backfill failed"
            self.backfills.record(batch, DONE, recorded)
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
                self.backfills.record(batch, INTENT, recorded)
                drifted = self.family_versions.verify(version, step, self.moving())
                if drifted:
                    self.family_versions.record(version, FAILED, f"verification: {drifted}")
                    return f"{version.family.name} version {version.version}: verification failed: {drifted}"
                self.backfills.record(batch, DONE, recorded)
                if step < version.chunks:
                    return (
                        f"{version.family.name} version {version.version}: verified "
                        f"{step + 1}/{version.chunks} chunks"
                    )
            if NO_SWAP in version.options.split(","):
                self.family_versions.record(version, BUILT)
                return f"{version.family.name} version {version.version}: built and verified, not serving (--no-swap)"
        if chunk >= version.chunks:
            self.family_versions.swap(version)
            return f"{version.family.name} version {version.version}: built, now serving"
        return f"{version.family.name} version {version.version}: {chunk}/{version.chunks} chunks"


def maintainer_for(config: ProjectorConfig, ch: ClickHouse) -> ReadModelMaintainer | None:
    """The read-model maintainer a command works with, or None when this configuration keeps
    no read models (`maintain_read_models = false`)."""
    if not config.maintain_read_models:
        return None
    return maintainer_of(config, ch)


def maintainer_of(config: ProjectorConfig, ch: ClickHouse) -> ReadModelMaintainer:
    return ReadModelMaintainer(
        ch,
        load_definitions(config.read_models_file),
        config.read_model_schema,
        replica_database=f"{config.replica_prefix}{config.read_model_schema}",
        database=config.read_model_database,
        control_database=config.control_database,
        chunk_keys=config.read_model_backfill_chunk_keys,
    )
