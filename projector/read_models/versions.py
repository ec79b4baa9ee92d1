"""A read-model family's versions: what a version is, its states, and what moves it from one to
the next.

A version (`FamilyVersion`) is a family's definition (projector/read_models/definitions.py)
built into tables of its own (projector/read_models/version_tables.py); `read_model_versions` in
the control database records each one's state (latest row per family and version):

    building ──(last chunk, verified)──> serving ──(rollback)──> previous ──(drop-old)──> retired
       │   └──(--no-swap)──> built ──(--swap)──> serving     previous ──(rollback)──> serving
       └──(verification finds a difference / a definition fails)──> failed
    (a version that starts serving retires the family's others and drops their tables, but
    for the one a rebuild replaces: that one is kept, as `previous`)

A new or changed family version is built beside the serving one: its tables are maintained by
every batch from the moment they exist, and `backfill_step` (projector/read_models/maintenance.py)
recomputes all keys chunk by chunk (each chunk an intent of its own, projection
`read_model_backfill`), between batches on the same thread. When the last chunk is done, the
views `read_models.<name>` switch to the new tables in one statement each and the old version's
tables are dropped (`swap`).

A rebuild (`projector rebuild`, projector/operations/read_model_rebuild.py) builds the same
definition again, as a version of its own (`<definition hash>r<request>`: its tables are new),
the same way; before it serves it is verified (`verify`, a step at a time: its rows equal to its
definition over the replicas, exact since nothing is applied between batches), and the version
it replaces is kept, still maintained by every batch, as `previous`: a rollback points the
views back at it, exact at once, until it is dropped (`--drop-old`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from projector.clickhouse import ClickHouse, ident, quote
from projector.commit.checkpoint import DONE, CheckpointStore
from projector.errors import RebuildRefused, raise_unless_refused
from projector.read_models.definitions import (
    Family,
    ReadModelDefinitions,
    family_from_json,
    family_to_json,
)
from projector.read_models.version_tables import NO_SWAP, REBUILD, FamilyVersion, VersionTables

log = logging.getLogger("projector.read_models")

BACKFILL = "read_model_backfill"  # the checkpoint projection of backfill chunks
BUILDING, SERVING, RETIRED, FAILED = "building", "serving", "retired", "failed"
# A rebuild's states: `built` (verified, not serving: `--no-swap`), `previous` (replaced by a
# rebuild, kept and maintained for a rollback). Both are maintained by every batch.
BUILT, PREVIOUS = "built", "previous"
MAINTAINED = (SERVING, BUILDING, BUILT, PREVIOUS)
INTEGER_TYPES = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")


def failed_read_models(ch: ClickHouse, control_database: str) -> dict[str, str]:
    """The read models whose family serves no version and has a failed one, each with the
    newest failure's reason (what the query service answers instead of their stale rows). A
    family still building its first version has not failed."""
    families: dict[str, tuple[bool, str, list[str]]] = {}  # family: serving, error, models
    for row in ch.rows(
        f"SELECT family, state, error, definition FROM {ident(control_database)}"
        f".read_model_versions FINAL WHERE state IN ({quote(SERVING)}, {quote(FAILED)}) "
        "ORDER BY build"
    ):
        serving, error, models = families.get(row["family"], (False, "", []))
        if row["state"] == SERVING:
            serving = True
        else:
            error = row["error"] or "failed"
            models = [m.name for m in family_from_json(row["definition"]).models]
        families[row["family"]] = (serving, error, models)
    return {
        model: error
        for serving, error, models in families.values()
        if not serving and error
        for model in models
    }


class FamilyVersions:
    """Every family's versions: their records, the versions batches maintain (`active`), and
    the moves between states (start, verify, swap, rollback, drop)."""

    def __init__(
        self,
        ch: ClickHouse,
        definitions: ReadModelDefinitions,
        replica_database: str,
        database: str,
        control_database: str,
        chunk_keys: int = 250_000,
    ) -> None:
        self.ch = ch
        self.definitions = definitions
        self.chunk_keys = chunk_keys  # keys recomputed per backfill chunk
        self.replica_database = replica_database
        self.database = database
        self.state_table = f"{ident(control_database)}.read_model_versions"
        self.backfills = CheckpointStore(ch, control_database, BACKFILL)
        self.tables = VersionTables(ch, replica_database, database)
        self.active: dict[str, list[FamilyVersion]] = {}  # family -> serving and/or building
        # Sources of families kept before whose replicas are missing now (a table reset dropped
        # one): the stage holds their ranges until the family is kept again (`ensure`).
        self.waiting: set[str] = set()
        self._created = False

    # ---- set-up ------------------------------------------------------------------------------

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.database))
        self.backfills.create()  # and the control database
        self.ch.execute(
            topology.create_table(
                self.state_table,
                [
                    "family String",
                    "version String",
                    "state LowCardinality(String)",
                    "chunks UInt32",
                    "key_min Nullable(Int64)",
                    "key_max Nullable(Int64)",
                    "build UInt64",
                    "definition String",
                    "error String",
                    "seq UInt64",
                    "recorded_at DateTime64(3) DEFAULT now64(3)",
                    "options String DEFAULT ''",
                ],
                "ReplacingMergeTree",
                "seq",
                "(family, version)",
                deduplicate=False,
            )
        )
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
        self.waiting = set()
        if not pending:
            return []
        existing = {
            r["name"]
            for r in self.ch.rows(
                f"SELECT name FROM system.tables WHERE database = {quote(self.replica_database)}"
            )
        }
        recorded = self.recorded()
        done = []
        for family in pending:
            mine = recorded.get(family.name, [])
            if not set(family.entity.sources) <= existing:
                if any(v.state in MAINTAINED for v in mine):  # kept before: it waits (held)
                    self.waiting |= set(family.entity.sources)
                continue
            # This definition has a version unless the only ones are rebuilds not serving yet
            # (a failed version stays failed: a rebuild brings it back).
            current = next(
                (
                    v
                    for v in mine
                    if v.family.version == family.version
                    and v.state != RETIRED
                    and (not v.rebuild or v.state in (SERVING, PREVIOUS, BUILT))
                ),
                None,
            )
            started = []
            if current is None:
                started = [self.start(family)]
                done.append(f"building {family.name} version {family.version} (backfilling)")
            # The serving version serves, and is kept current, until a new one is built; a
            # building version of an older definition is abandoned (retired at the next swap).
            active = [
                v
                for v in [*mine, *started]
                if v.state in (SERVING, BUILT, PREVIOUS)
                or (v.state == BUILDING and v.family.version == family.version)
            ]
            for version in active:
                version.columns = self.tables.entity_columns(version)
            for version in active:  # each by its own definition (a new one may differ)
                incomplete = self.incomplete_affects(version.family)
                if incomplete:
                    log.error("read model %s cannot be kept exact: %s", version.version, incomplete)
                    self.record(version, FAILED, incomplete)
            self.active[family.name] = [v for v in active if v.state != FAILED]
        return done

    def incomplete_affects(self, family: Family) -> str:
        """Why `affects` would miss keys, or "" when it cannot.

        A delete carries only its key (Postgres sends the replica identity, the primary key by
        default, and the replica's deletion marker holds nothing else), and an update only its
        new image: an `affects` that reads any other column of `{changed}` misses the keys a
        deleted row touched, or the parent a row moved away from. So each source's `affects` is
        tried on ClickHouse with `{changed}` standing for an empty table of the source's key
        columns and row metadata only; a statement ClickHouse refuses names the column. (Map a
        non-key column through the parent instead: `SELECT order_id FROM {order_items}` needs
        `order_id` in the line's key.)"""
        for source in family.entity.affects:
            described = self.ch.rows(
                f"SELECT name, is_in_sorting_key AS k FROM system.columns "
                f"WHERE database = {quote(self.replica_database)} AND table = {quote(source)}"
            )
            keys = [r["name"] for r in described if r["k"] and not r["name"].startswith("_")]
            if not keys:
                continue  # no key (an append-only history): nothing is deleted by key
            carried = [r["name"] for r in described if r["k"] or r["name"].startswith("_")]
            changed = (
                f"SELECT {', '.join(ident(c) for c in carried)} "
                f"FROM {ident(self.replica_database)}.{ident(source)} LIMIT 0"
            )
            try:
                self.ch.rows(
                    "SELECT count() AS n FROM "
                    f"({family.entity.affected_keys(source, self.replica_database, changed)})"
                )
            except Exception as exc:
                raise_unless_refused(exc)
                return (
                    f"affects of {source} reads a column a delete does not carry (a delete "
                    f"carries the key {', '.join(keys)} only; an update, its new image only): "
                    f"{str(exc).strip().splitlines()[0][:300]}"
                )
        return ""

    def ensure_known(self) -> None:
        """Load the recorded versions to report on, creating nothing new."""
        if not self._created:
            self.create()
        for name, versions in self.recorded().items():
            self.active[name] = [v for v in versions if v.state in MAINTAINED]
            for version in self.active[name]:
                version.columns = self.tables.entity_columns(version)

    def recorded(self) -> dict[str, list[FamilyVersion]]:
        """Every recorded version, each with the definition it was built from."""
        found: dict[str, list[FamilyVersion]] = {}
        for row in self.ch.rows(
            f"SELECT family, version, state, chunks, key_min, key_max, build, definition, options "
            f"FROM {self.state_table} FINAL ORDER BY build"
        ):
            family = family_from_json(row["definition"])
            found.setdefault(row["family"], []).append(
                FamilyVersion(
                    family,
                    row["version"],
                    self.database,
                    row["state"],
                    int(row["chunks"]),
                    _int(row["key_min"]),
                    _int(row["key_max"]),
                    int(row["build"]),
                    options=row["options"],
                )
            )
        return found

    def record(self, version: FamilyVersion, state: str, error: str = "") -> None:
        version.state = state
        self.ch.execute(
            f"INSERT INTO {self.state_table} (family, version, state, chunks, key_min, key_max, "
            f"build, definition, error, seq, options) VALUES ({quote(version.family.name)}, "
            f"{quote(version.version)}, {quote(state)}, {version.chunks}, "
            f"{_sql_int(version.key_min)}, {_sql_int(version.key_max)}, {version.build}, "
            f"{quote(family_to_json(version.family))}, {quote(error[:2000])}, {time.time_ns()}, "
            f"{quote(version.options)})"
        )

    def start(self, family: Family, name: str | None = None, options: str = "") -> FamilyVersion:
        """Create a version's tables (empty) and plan its backfill; `name` names its tables
        (default: the definition's hash)."""
        version = FamilyVersion(
            family,
            name or family.version,
            self.database,
            BUILDING,
            build=time.time_ns(),
            options=options,
        )
        described = self.tables.create(version)
        entity = family.entity
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
        self.record(version, BUILDING)
        log.info(
            "read-model family %s version %s: %d keys to backfill in %d chunks",
            family.name,
            version.version,
            int(stats["n"]),
            version.chunks,
        )
        return version

    # ---- building: swapped in when built (the backfill is maintenance.py's) ---------------------

    def verify(
        self, version: FamilyVersion, step: int, moving: dict[str, str] | None = None
    ) -> str:
        """One step of a built version's verification (by the stage, between its ranges):
        step i < chunks compares the entity rows of key chunk i with the definition evaluated
        over the replicas for those keys, but for the keys the replicas changed beyond the
        stage's position (`moving`: per source table, a condition on `_partition`/`_offset`;
        the stage recomputes them next); step `chunks` compares each aggregate with the
        aggregate evaluated over the entity rows (checked against the definition by the steps
        before, and kept by the stage since), and each index with its model's rows. The models
        that differ, with a row each, or "" when equal."""
        entity = version.family.entity
        columns = ", ".join(ident(c) for c in version.columns)
        if step < version.chunks:
            where = self.tables.settled_keys(version, version.chunk_predicate(step), moving)
            keys = f"SELECT {ident(entity.by)} FROM ({entity.all_keys(self.replica_database)}) AS k WHERE {where}"
            pairs = [
                (
                    entity.name,
                    f"SELECT {columns} FROM {version.entity_table} FINAL WHERE {where}",
                    f"SELECT {columns} FROM ({entity.select(self.replica_database, keys)})",
                )
            ]
        else:
            rows = f"(SELECT {columns} FROM {version.entity_table} FINAL)"
            pairs = [
                (a.name, a.served(version.table(a.name)), a.evaluated(rows))
                for a in version.family.aggregates
            ]
            # an index holds its model's rows, no more, no less (the model checked above)
            model_rows = {entity.name: rows[1:-1]} | {
                a.name: a.served(version.table(a.name)) for a in version.family.aggregates
            }
            for index in version.family.indexes:
                served = ", ".join(ident(c) for c in version.served_columns(index.of))
                pairs.append(
                    (
                        index.name,
                        f"SELECT {served} FROM {version.table(index.name)} FINAL",
                        model_rows[index.of],
                    )
                )
        drifted = []
        for name, stored, defined in pairs:
            diff = self.ch.rows(
                f"SELECT * FROM (({stored}) EXCEPT ({defined})) UNION ALL "
                f"SELECT * FROM (({defined}) EXCEPT ({stored})) LIMIT 1 SETTINGS join_use_nulls = 1"
            )
            if diff:
                drifted.append(f"{name} differs (e.g. {diff[0]})")
        return "; ".join(drifted)

    def swap(self, version: FamilyVersion) -> None:
        """Point every read model of the family at the new version, then retire the old one —
        or, when the new one is a rebuild, keep the serving one as `previous` (maintained) for a
        rollback. Each view switches in one statement: a reader sees the old version or the new,
        both complete."""
        family = version.family
        self.tables.point_views(version)
        old = [
            v
            for v in self.recorded().get(family.name, [])
            if v.version != version.version and v.state in (*MAINTAINED, FAILED)
        ]
        self.record(version, SERVING)
        kept: list[FamilyVersion] = []
        for previous in old:
            if version.rebuild and previous.state == SERVING:
                self.record(previous, PREVIOUS)
                kept.extend(
                    v for v in self.active.get(family.name, []) if v.version == previous.version
                )
                for v in kept:
                    v.state = PREVIOUS
                continue
            self.record(previous, RETIRED)
            self.tables.drop(previous)
        self.active[family.name] = [version, *kept]

    # ---- rebuilds: projector/operations/read_model_rebuild.py asks, between batches --------------

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
            raise RebuildRefused(
                f"{family.name} is already building version "
                f"{building[0].version}: wait for it (`projector read-models list`)"
            )
        options = ",".join([REBUILD, NO_SWAP] if no_swap else [REBUILD])
        version = self.start(family, label, options)
        version.columns = self.tables.entity_columns(version)
        versions.append(version)
        return version

    def swap_built(self, name: str) -> str:
        """Serve the family's version a `--no-swap` rebuild left built."""
        family = self.family_named(name)
        built = [v for v in self.active.get(family.name, []) if v.state == BUILT]
        if not built:
            raise RebuildRefused(
                f"{family.name} has no built version waiting to serve "
                f"(`projector rebuild {name} --no-swap` builds one)"
            )
        self.swap(built[-1])
        return f"{family.name} version {built[-1].version} serving"

    def rollback(self, name: str) -> str:
        """Serve the previous version again (kept current by every batch, so exact now); the
        version serving until now becomes the previous one (a second rollback goes forward)."""
        family = self.family_named(name)
        versions = self.active.get(family.name, [])
        previous = [v for v in versions if v.state == PREVIOUS]
        if not previous:
            raise RebuildRefused(
                f"{family.name} keeps no previous version (never rebuilt, or "
                "dropped with --drop-old)"
            )
        back = previous[-1]
        self.tables.point_views(back)
        for version in versions:
            if version.state == SERVING:
                self.record(version, PREVIOUS)
        self.record(back, SERVING)
        return f"{family.name} version {back.version} serving again"

    def drop_old(self, name: str) -> str:
        """Drop the previous version's tables (no rollback after this)."""
        family = self.family_named(name)
        versions = self.active.get(family.name, [])
        previous = [v for v in versions if v.state == PREVIOUS]
        if not previous:
            raise RebuildRefused(f"{family.name} keeps no previous version to drop")
        for version in previous:
            self.record(version, RETIRED)
            self.tables.drop(version)
        self.active[family.name] = [v for v in versions if v.state != RETIRED]
        return f"{family.name}: dropped version {', '.join(v.version for v in previous)}"

    # ---- what ops and tests read ----

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
            found.append(
                {
                    "family": row["family"],
                    "version": row["version"],
                    "state": row["state"],
                    "backfill": backfill,
                    "models": [m.name for m in family.models],
                    "error": row["error"],
                    "options": row["options"],
                    "chunks": chunks,
                    "done_chunks": min(done, chunks),
                    "steps": steps,
                    "done_steps": min(done, steps),
                }
            )
        return found

    def reconcile(
        self, limit: int = 10, moving: dict[str, str] | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """Each serving read model against its definition evaluated over the replicas now:
        per model, up to `limit` rows found on one side only (`_side` says which). Exact only
        while nothing is applied (the projector stopped), unless `moving` is given (per source
        table, the replica rows beyond the read models' stage: projector/read_models/stage.py
        `beyond`): then each entity is compared for the keys those rows do not touch, and each
        aggregate and index with the stored entity rows — what holds while the stage follows."""
        found: dict[str, list[dict[str, Any]]] = {}
        for versions in self.active.values():
            for version in versions:
                if version.state != SERVING:
                    continue
                for name, stored, defined in self._reconcile_pairs(version, moving):
                    diff = self.ch.rows(
                        f"SELECT 'read model only' AS _side, * FROM (({stored}) EXCEPT ({defined})) "
                        f"UNION ALL SELECT 'definition only' AS _side, * FROM "
                        f"(({defined}) EXCEPT ({stored})) LIMIT {int(limit)} "
                        "SETTINGS join_use_nulls = 1"
                    )
                    found[name] = diff
        return found

    def _reconcile_pairs(
        self, version: FamilyVersion, moving: dict[str, str] | None = None
    ) -> list[tuple[str, str, str]]:
        entity = version.family.entity
        columns = ", ".join(ident(c) for c in version.columns)
        all_keys = entity.all_keys(self.replica_database)
        defined_rows = entity.select(self.replica_database, all_keys)
        stored_rows = f"SELECT {columns} FROM {version.entity_table} FINAL"
        if moving is None:
            pairs = [(entity.name, stored_rows, f"SELECT {columns} FROM ({defined_rows})")]
        else:
            settled = self.tables.settled_keys(version, "1", moving)
            keys = f"SELECT {ident(entity.by)} FROM ({all_keys}) AS k WHERE {settled}"
            pairs = [
                (
                    entity.name,
                    f"{stored_rows} WHERE {settled}",
                    f"SELECT {columns} FROM ({entity.select(self.replica_database, keys)})",
                )
            ]
            defined_rows = stored_rows  # aggregates and indexes: over the stored entity rows
        for aggregate in version.family.aggregates:
            pairs.append(
                (
                    aggregate.name,
                    aggregate.served(version.table(aggregate.name)),
                    aggregate.evaluated(f"({defined_rows})"),
                )
            )
        defined = dict((name, sql) for name, _, sql in pairs)
        if moving is not None:  # an index against its model as stored (it follows the model)
            defined = {name: stored for name, stored, _ in pairs} | {entity.name: stored_rows}
        for index in version.family.indexes:  # an index holds its model's rows, no more, no less
            served = ", ".join(ident(c) for c in version.served_columns(index.of))
            pairs.append(
                (
                    index.name,
                    f"SELECT {served} FROM {version.table(index.name)} FINAL",
                    defined[index.of],
                )
            )
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
