"""`projector verify`: ClickHouse reconciled with Postgres, per replica table and per read model.

A replica table is compared with its source table in these steps (`TableVerifier.verify`):

  1. Open a REPEATABLE READ snapshot in Postgres and read its WAL position L: every transaction the
     snapshot shows committed before L.
  2. When a projector runs with transaction metadata (server backend), wait until its consistency
     LSN for the table (projector/commit/ledger.py) has passed L: from then on ClickHouse shows at
     least everything the snapshot shows.
  3. Count and hash, on both sides, the rows of each *range*: ranges split the space of a key's
     hash (the first hex digits of md5 over the key's canonical text), so they are of even size
     for any key type. A row's hash is the first 60 bits of md5 over its canonical text
     (schemas/canonical_text.py: both sides compute the same text); a range's hash is the sum of
     its rows' hashes, which no row order changes. ClickHouse's side is the replica `FINAL`: the
     newest version of each key, deleted keys left out.
  4. Split each range whose count or hash differs 16 ways, and again, until it holds at most
     `LEAF_ROWS` rows; read those rows' texts on both sides and compare them key by key: a key
     found on one side only, or whose columns differ (named).
  5. Check the differing keys again, in a newer snapshot each time, `RECHECK_DELAYS_S` apart,
     when a projector may be applying changes meanwhile: compare them until they agree or
     ClickHouse has passed that snapshot too (step 2). ClickHouse may be *ahead* of a snapshot
     (step 2 only bounds it from below): a key changed after the first snapshot agrees in a
     newer one. The keys that differ every time are the drift.

All tables share one snapshot and one wait (a wait costs the pipeline's latency).

Read models are compared with their definitions over the replicas by the read-model maintainer
(`FamilyVersions.reconcile`, projector/read_models/versions.py); this module only reports them beside
the tables, checked again the same way while a projector runs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from projector.clickhouse import ClickHouse, ident, literal_chunks, quote
from projector.commit.checkpoint import PROJECTION
from projector.commit.consistency import ConsistencyTracker
from projector.commit.ledger import TransactionLedger
from projector.commit.transactions import lsn_text, parse_lsn
from projector.config import ProjectorConfig, open_backend
from projector.errors import ProjectorError, VerifyError
from projector.operations.verify_plan import Column, TablePlan
from projector.read_models.maintenance import ReadModelMaintainer, maintainer_for
from projector.read_models.versions import SERVING
from schemas.canonical_text import canonical_text

LEAF_ROWS = 1000  # a range this small is compared row by row
MAX_ROWS_COMPARED = 100_000  # row by row per table; differing ranges beyond are only counted
MAX_START_DIGITS = 4  # at most 16^4 ranges in the first pass
RECHECK_DELAYS_S = (0.5, 1.0, 2.0)  # between the checks of step 5, while a projector runs
# A row comparison's selection: Postgres' WHERE (with one %s), ClickHouse's, the %s value.
Condition = tuple[str, str, list[str]]
CATCH_UP_TIMEOUT_S = 120.0  # step 2: how long the projector may take to pass the snapshot

POSTGRES_ONLY, CLICKHOUSE_ONLY, DIFFERENT = "postgres only", "clickhouse only", "different"


@dataclass(frozen=True)
class Drift:
    """One key whose row differs: on one side only, or in the columns named."""

    key: dict[str, Any]
    side: str  # POSTGRES_ONLY, CLICKHOUSE_ONLY or DIFFERENT
    columns: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "side": self.side, "columns": list(self.columns)}


@dataclass
class Verdict:
    """What verify found for one replica table or read model."""

    name: str
    kind: str  # "table" or "read model"
    postgres_rows: int | None = None
    clickhouse_rows: int | None = None
    ranges: str = ""  # how many ranges were compared, e.g. "16 of 16"
    drift: list[Drift] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)  # columns, each with its reason
    rows: list[dict[str, Any]] = field(default_factory=list)  # a read model's differing rows
    ranges_not_listed: int = 0  # differing ranges beyond MAX_ROWS_COMPARED: keys not listed

    @property
    def equal(self) -> bool:
        return not self.drift and not self.rows and not self.ranges_not_listed

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "equal": self.equal,
            "postgres_rows": self.postgres_rows,
            "clickhouse_rows": self.clickhouse_rows,
            "ranges": self.ranges,
            "drift": [d.as_json() for d in self.drift],
            "read_model_rows": self.rows,
            "not_compared": self.not_compared,
            "ranges_not_listed": self.ranges_not_listed,
        }


class PostgresSnapshot:
    """The source side: one REPEATABLE READ transaction at a time (steps 1 and 3-5)."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        try:
            self.conn = psycopg.connect(dsn, connect_timeout=10)
        except psycopg.Error as exc:
            raise VerifyError(f"cannot connect to Postgres to verify against it: {exc}") from exc
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.lsn = 0

    def renew(self) -> int:
        """A new snapshot; returns its WAL position (step 1)."""
        self.conn.rollback()
        row = self.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        self.lsn = parse_lsn(str(row[0]))
        return self.lsn

    def rows(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Always with parameters, so `%` is always escaped the same way (`pg_ident`)."""
        return list(self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        self.conn.close()


class TableVerifier:
    """Steps 1-5 of the module docstring for the replica tables of one deployment."""

    # `progress(step, completed=n)`: the step verify is at; `completed`, the tables done so far.
    def __init__(
        self,
        config: ProjectorConfig,
        ch: ClickHouse,
        postgres: PostgresSnapshot,
        projector_may_run: bool,
        progress: Callable[..., None] = lambda *_, **__: None,
    ) -> None:
        self.config = config
        self.ch = ch
        self.pg = postgres
        self.projector_may_run = projector_may_run
        self.progress = progress
        self._tracker: ConsistencyTracker | None = None

    # ---- what there is ------------------------------------------------------------------------

    def replica_tables(self) -> list[str]:
        """Every replica table in ClickHouse, as its source's SCHEMA.TABLE."""
        prefix = self.config.replica_prefix
        rows = self.ch.rows(
            "SELECT database, name FROM system.tables WHERE startsWith(database, "
            f"{quote(prefix)}) AND engine LIKE '%MergeTree' ORDER BY database, name"
        )
        return [f"{r['database'][len(prefix) :]}.{r['name']}" for r in rows]

    def plan(self, name: str, database: str | None = None) -> TablePlan | str:
        """How `name` (SCHEMA.TABLE) is compared, or why it cannot be; `database`: where its
        replica is, when not the replica database (a rebuild's shadow)."""
        schema, _, table = name.partition(".")
        database = database or self.config.replica_prefix + schema
        replica_columns = {
            r["name"]
            for r in self.ch.rows(
                f"SELECT name FROM system.columns WHERE database = {quote(database)} "
                f"AND table = {quote(table)}"
            )
        }
        if not replica_columns:
            return f"no replica table {database}.{table} in ClickHouse"
        described = self.pg.rows(SOURCE_COLUMNS, (schema, table))
        if not described:
            return f"no table {name} in Postgres"
        columns: list[Column] = []
        keys: list[Column] = []
        skipped: list[str] = []
        for column, pg_type, element, is_key in described:
            rule = canonical_text(pg_type, element)
            if column not in replica_columns:
                skipped.append(f"{column} (not in the replica yet)")
            elif rule is None:
                shown = f"{element}[]" if element else pg_type
                skipped.append(f"{column} ({shown}: no canonical text, see docs/operations.md)")
            else:
                columns.append(Column(column, rule))
                if is_key:
                    keys.append(columns[-1])
        key_names = [r[0] for r in described if r[3]]
        if not key_names:
            return "no primary key: its replica keeps every event, not rows to compare"
        if len(keys) != len(key_names):
            return "a key column has no canonical text"
        filtered = self.pg.rows(
            "SELECT rowfilter FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s "
            "AND tablename = %s AND rowfilter IS NOT NULL",
            (self.config.publication, schema, table),
        )
        return TablePlan(
            schema,
            table,
            f"{ident(database)}.{ident(table)}",
            keys,
            columns,
            skipped,
            filtered[0][0] if filtered else None,
        )

    # ---- steps ---------------------------------------------------------------------------------

    def verify(self, plans: list[TablePlan], sample: int | None = None) -> list[Verdict]:
        """Steps 1-5 for the tables `plans`, in one snapshot (and one wait) for all of them."""
        names = [p.name for p in plans]
        lsn = self.pg.renew()  # 1.
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while not self._applied_through(lsn, names, deadline):  # 2.
            time.sleep(0.2)
        verdicts: dict[str, Verdict] = {}
        drift: dict[str, dict[str, Drift]] = {}
        for done, plan in enumerate(plans, 1):
            verdicts[plan.name], drift[plan.name] = self._compare(plan, sample)  # 3. and 4.
            self.progress(f"{plan.name}: compared", completed=done)
        for delay in RECHECK_DELAYS_S if self.projector_may_run else ():  # 5.
            drifting = [p for p in plans if drift[p.name]]
            if not drifting:
                break
            time.sleep(delay)
            lsn = self.pg.renew()
            deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
            # Compare until the keys agree or ClickHouse has passed the snapshot: a key
            # ClickHouse had applied beyond the first snapshot agrees at once.
            while True:
                passed = self._applied_through(lsn, [p.name for p in drifting], deadline)
                for plan in drifting:
                    self.progress(f"{plan.name}: checking {len(drift[plan.name])} key(s) again")
                    keys = self._key_conditions(plan, list(drift[plan.name]))
                    drift[plan.name] = self._compare_rows(plan, keys)
                drifting = [p for p in drifting if drift[p.name]]
                if passed or not drifting:
                    break
                time.sleep(0.5)
        for name, verdict in verdicts.items():
            verdict.drift = [drift[name][k] for k in sorted(drift[name])]
        return list(verdicts.values())

    def compare_now(
        self, plan: TablePlan, keys: list[str] | None = None
    ) -> tuple[Verdict, dict[str, Drift]]:
        """Steps 1, 3 and 4 for one table whose replica does not move meanwhile (a rebuild's
        shadow, compared between batches): a new snapshot, then the whole table, or only `keys`
        (key texts, as `Drift`s are keyed) when given."""
        self.pg.renew()
        if keys is None:
            return self._compare(plan, None)
        verdict = Verdict(plan.name, "table", not_compared=plan.not_compared)
        verdict.postgres_rows, verdict.clickhouse_rows = self._count(plan)
        return verdict, self._compare_rows(plan, self._key_conditions(plan, keys))

    def _compare(self, plan: TablePlan, sample: int | None) -> tuple[Verdict, dict[str, Drift]]:
        """Steps 3 and 4 for one table, in the current snapshot."""
        self.progress(f"{plan.name}: counting rows")
        verdict = Verdict(plan.name, "table", not_compared=plan.not_compared)
        total = self._count(plan)
        verdict.postgres_rows, verdict.clickhouse_rows = total
        digits = max(1, min(MAX_START_DIGITS, math.ceil(math.log(max(total) / LEAF_ROWS + 1, 16))))
        ranges = 16**digits
        within: list[str] | None = None
        if sample is not None and sample < ranges:
            within = sorted(f"{r:0{digits}x}" for r in random.sample(range(ranges), sample))
        verdict.ranges = f"{len(within) if within is not None else ranges} of {ranges}"
        leaves = self._differing_ranges(plan, digits, within)
        # Row by row for at most MAX_ROWS_COMPARED rows: a table that drifted everywhere (an
        # empty replica, say) is named, not copied into this process.
        compared: list[str] = []
        rows = 0
        for prefix, size in leaves:
            if compared and rows + size > MAX_ROWS_COMPARED:
                verdict.ranges_not_listed = len(leaves) - len(compared)
                break
            compared.append(prefix)
            rows += size
        return verdict, self._compare_rows(plan, self._leaf_conditions(plan, compared))

    def _applied_through(self, lsn: int, tables: list[str], deadline: float) -> bool:
        """Step 2: whether the projector has applied every transaction on `tables` committed up
        to `lsn` (its consistency LSN, projector/commit/ledger.py). True when no projector may
        run meanwhile, or without transaction metadata (then only step 5 applies)."""
        if not (self.projector_may_run and self.config.transaction_metadata):
            return True
        if self._tracker is None:
            ledger = TransactionLedger(self.ch, self.config.control_database, PROJECTION)
            self._tracker = ConsistencyTracker(ledger, {"tables": tables})
        self._tracker.groups = {"tables": tables}
        applied = self._tracker.refresh()["tables"].lsn
        if applied >= lsn:
            return True
        if time.monotonic() > deadline:
            raise VerifyError(
                f"the projector has not applied {', '.join(tables)} up to Postgres' position "
                f"{lsn_text(lsn)} within {CATCH_UP_TIMEOUT_S:.0f}s (it is at "
                f"{lsn_text(applied)}): is it running? `projector status` shows its lag"
            )
        self.progress(f"waiting for the projector to pass Postgres' position {lsn_text(lsn)}")
        return False

    def _count(self, plan: TablePlan) -> tuple[int, int]:
        ((pg_count,),) = self.pg.rows(f"SELECT count(*) FROM {plan.source}")
        ch_count = self.ch.rows(f"SELECT count() AS n FROM {plan.replica} FINAL")[0]["n"]
        return int(pg_count), int(ch_count)

    def _range_hashes(
        self, plan: TablePlan, digits: int, within: list[str] | None
    ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        """Per range of `digits` hex digits (inside the ranges `within`): count and hash. The
        ranges `within` go into the statements a bounded group at a time."""
        if within is None:
            return self._range_hashes_in(plan, digits, None)
        pg: dict[str, tuple[int, int]] = {}
        ch: dict[str, tuple[int, int]] = {}
        for group in literal_chunks(within, quote):
            more_pg, more_ch = self._range_hashes_in(plan, digits, group)
            pg.update(more_pg)
            ch.update(more_ch)
        return pg, ch

    def _range_hashes_in(
        self, plan: TablePlan, digits: int, within: list[str] | None
    ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        parent = len(within[0]) if within else 0
        pg_key, ch_key = (
            f"md5({plan.key_text('postgres')})",
            (f"lower(hex(MD5({plan.key_text('clickhouse')})))"),
        )
        pg_where = f"WHERE substr({pg_key}, 1, {parent}) = ANY(%s)" if within else ""
        ch_where = (
            f"WHERE substring({ch_key}, 1, {parent}) IN ({', '.join(map(quote, within))})"
            if within
            else ""
        )
        pg = self.pg.rows(
            f"SELECT substr({pg_key}, 1, {digits}), count(*), "
            f"sum(('x' || substr(md5({plan.row_text('postgres')}), 1, 15))::bit(60)::bigint) "
            f"FROM {plan.source} {pg_where} GROUP BY 1",
            (within,) if within else (),
        )
        ch = self.ch.rows(
            # Aliases no source column has (a column `n` would otherwise mean the count).
            f"SELECT substring({ch_key}, 1, {digits}) AS __range, count() AS __rows, "
            "toString(sum(toUInt128("
            f"reinterpretAsUInt64(reverse(unhex(concat('0', substring(hex(MD5("
            f"{plan.row_text('clickhouse')})), 1, 15)))))))) AS __hash "
            f"FROM {plan.replica} FINAL {ch_where} GROUP BY __range"
        )
        return (
            {str(r): (int(n), int(h)) for r, n, h in pg},
            {str(r["__range"]): (int(r["__rows"]), int(r["__hash"])) for r in ch},
        )

    def _differing_ranges(
        self, plan: TablePlan, digits: int, within: list[str] | None
    ) -> list[tuple[str, int]]:
        """Steps 3 and 4: the smallest ranges that differ, each of at most LEAF_ROWS rows (with
        the rows of the larger side)."""
        leaves: list[tuple[str, int]] = []
        while within is None or within:
            self.progress(f"{plan.name}: hashing ranges of {digits} hex digit(s)")
            pg, ch = self._range_hashes(plan, digits, within)
            differing = [r for r in sorted(pg.keys() | ch.keys()) if pg.get(r) != ch.get(r)]
            deeper: list[str] = []
            for r in differing:
                rows = max(pg.get(r, (0, 0))[0], ch.get(r, (0, 0))[0])
                if rows <= LEAF_ROWS or digits >= 32:
                    leaves.append((r, rows))
                else:
                    deeper.append(r)
            within, digits = deeper, digits + 1
        return leaves

    def _leaf_conditions(self, plan: TablePlan, leaves: list[str]) -> list[Condition]:
        """The rows of the ranges `leaves`, a bounded group of ranges per condition."""
        pg_key = f"md5({plan.key_text('postgres')})"
        ch_key = f"lower(hex(MD5({plan.key_text('clickhouse')})))"
        return [
            (
                f"EXISTS (SELECT 1 FROM unnest(%s::text[]) AS l(r) WHERE starts_with({pg_key}, l.r))",
                " OR ".join(
                    f"substring({ch_key}, 1, {size}) IN ({', '.join(quote(r) for r in group if len(r) == size)})"
                    for size in sorted({len(r) for r in group})
                ),
                group,
            )
            for group in literal_chunks(leaves, quote)
        ]

    def _key_conditions(self, plan: TablePlan, keys: list[str]) -> list[Condition]:
        """The rows of `keys` (key texts), a bounded group of keys per condition."""
        return [
            (
                f"({plan.key_text('postgres')}) = ANY(%s)",
                f"{plan.key_text('clickhouse')} IN ({', '.join(map(quote, group))})",
                group,
            )
            for group in literal_chunks(keys, quote)
        ]

    def _compare_rows(self, plan: TablePlan, conditions: list[Condition]) -> dict[str, Drift]:
        """Step 4's row-by-row comparison of the rows the `conditions` select on both sides."""
        drift: dict[str, Drift] = {}
        for condition in conditions:
            drift.update(self._compare_rows_where(plan, condition))
        return drift

    def _compare_rows_where(self, plan: TablePlan, condition: Condition) -> dict[str, Drift]:
        pg_where, ch_where, values = condition
        params = (values,)
        names = [c.name for c in plan.columns]
        pg_rows = self.pg.rows(
            f"SELECT {plan.key_text('postgres')}, {', '.join(plan.column_texts('postgres'))} "
            f"FROM {plan.source} WHERE {pg_where}",
            params,
        )
        source = {row[0]: dict(zip(names, row[1:], strict=True)) for row in pg_rows}
        ch_rows = self.ch.rows(
            f"SELECT {plan.key_text('clickhouse')} AS __key, "
            f"{', '.join(plan.column_texts('clickhouse'))} FROM {plan.replica} FINAL "
            f"WHERE {ch_where}"
        )
        replica = {row.pop("__key"): row for row in ch_rows}
        return differences(plan, source, replica)


def differences(
    plan: TablePlan, source: dict[str, dict[str, Any]], replica: dict[str, dict[str, Any]]
) -> dict[str, Drift]:
    """Step 4's verdict per key, from both sides' rows (key text: column: canonical text)."""
    names, key_names = [c.name for c in plan.columns], [c.name for c in plan.keys]
    drift: dict[str, Drift] = {}
    for key in source.keys() | replica.keys():
        ours, theirs = source.get(key), replica.get(key)
        key_values = {name: (ours or theirs or {})[name] for name in key_names}
        if theirs is None:
            drift[key] = Drift(key_values, POSTGRES_ONLY)
        elif ours is None:
            drift[key] = Drift(key_values, CLICKHOUSE_ONLY)
        elif columns := tuple(n for n in names if _text(ours[n]) != _text(theirs[n])):
            drift[key] = Drift(key_values, DIFFERENT, columns)
    return drift


def _text(value: Any) -> str | None:
    """A canonical text as read back (ClickHouse's JSON may give a number for a numeric text)."""
    return None if value is None else str(value)


# Per column of a source table: name, type (`enum` for an enum, a domain's base type), the
# element type of an array (else NULL), and whether it is part of the primary key.
SOURCE_COLUMNS = """
SELECT a.attname,
       CASE WHEN b.typtype = 'e' THEN 'enum' ELSE b.typname END,
       CASE WHEN b.typcategory = 'A' THEN
            (SELECT CASE WHEN e.typtype = 'e' THEN 'enum' ELSE e.typname END
             FROM pg_type e WHERE e.oid = b.typelem) END,
       coalesce(a.attnum = ANY(i.indkey), false)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def open_clickhouse(config: ProjectorConfig) -> ClickHouse:
    """The configured ClickHouse, answering; VerifyError when it cannot be opened or reached."""
    try:
        ch = open_backend(config)
        ch.rows("SELECT 1")
    except RuntimeError as exc:  # chDB's only error type; a held directory says no more
        raise VerifyError(
            f"cannot open the embedded ClickHouse at {config.chdb_path} ({exc}); most likely a "
            "projector owns it: on chDB, verify runs while no projector runs (stop it, or verify "
            "beside it on a ClickHouse server, PROJECTOR_BACKEND=server)"
        ) from exc
    except ProjectorError as exc:
        raise VerifyError(f"cannot reach ClickHouse: {exc}") from exc
    return ch


def read_model_maintainer(config: ProjectorConfig, ch: ClickHouse) -> ReadModelMaintainer | None:
    """The read models' maintainer, knowing their versions (None: this configuration keeps no
    read models)."""
    maintainer = maintainer_for(config, ch)
    if maintainer is not None:
        maintainer.family_versions.ensure_known()
    return maintainer


def serving_read_models(maintainer: ReadModelMaintainer | None) -> list[str]:
    """The names of the read models a serving version holds: the ones verify compares."""
    if maintainer is None:
        return []
    return sorted(
        model.name
        for versions in maintainer.active.values()
        for version in versions
        if version.state == SERVING
        for model in version.family.models
    )


def verify_read_models(
    maintainer: Any,
    names: set[str] | None,
    projector_may_run: bool,
    limit: int = 20,
    moving: Callable[[], dict[str, str]] | None = None,
) -> list[Verdict]:
    """Each serving read model (of `names`, None: all) against its definition over the replicas
    (`FamilyVersions.reconcile`). While a projector may run, `moving` says which replica rows
    the read models' stage has not recomputed yet (its keys are compared next time), and a
    model that differs is checked again (the stage may be half-way through a range), reported
    only if it differs every time."""
    follow = moving if projector_may_run and moving is not None else lambda: None
    found: dict[str, list[dict[str, Any]]] = maintainer.family_versions.reconcile(limit, follow())
    for delay in RECHECK_DELAYS_S if projector_may_run else ():
        differing = {n for n, rows in found.items() if rows and (names is None or n in names)}
        if not differing:
            break
        time.sleep(delay)
        again = maintainer.family_versions.reconcile(limit, follow())
        found = {n: (again.get(n, []) if n in differing else rows) for n, rows in found.items()}
    return [
        Verdict(name, "read model", rows=rows)
        for name, rows in sorted(found.items())
        if names is None or name in names
    ]


@contextmanager
def source_snapshot(
    config: ProjectorConfig, fallback_dsn: str | None
) -> Iterator[PostgresSnapshot]:
    dsn = config.source_dsn or fallback_dsn
    if not dsn:
        raise VerifyError(
            "verify reads the source tables, and no source database is configured: set "
            "PROJECTOR_SOURCE_DSN (or `source_dsn` in the config file), or the connector's "
            "PG_HOST/PG_PORT/PG_DATABASE/CDC_USER/CDC_PASSWORD or ADMIN_DSN"
        )
    snapshot = PostgresSnapshot(dsn)
    try:
        yield snapshot
    finally:
        snapshot.close()
