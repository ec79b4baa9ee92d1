"""The read models' stage: one maintainer, under a fenced lease, following what the replicas
committed, exactly once across crashes and hand-overs.

The read models are not written by the batch that changes a replica. They follow the replicas'
checkpoints: the stage keeps a position of its own per source topic-partition (the last replica
offset whose rows it has recomputed) and recomputes each range between its position and the
replica's last done batch (projector/read_models/maintenance.py, `apply_range`). Every path that
changes a replica through a batch — a member's live batches, whichever member applied them, a
reset that moves a partition — reaches the read models by this one road, because it starts at the
replica; a path that writes replica rows at offsets the stage has passed (`projector dlq replay`)
asks for those offsets again through the work table (`request_recompute`), and a path that
replaces a replica's rows wholesale (`projector table reset`, a rebuild's swap or rollback) asks
for every key of the read models over that table (`request_every_key`).

**One maintainer.** Any number of projector processes may run with the same settings (a rolling
deploy, scale-out, `dlq replay` beside `run`). One of them holds the lease and maintains; the
others stand by. The lease is a claim on the pseudo-partition (`__read_models`, 0) in the owners
table, exactly as a member claims a Kafka partition (projector/commit/checkpoint.py, step A), and
the holder renews it every few seconds. A standby claims the next generation when the holder's
last renewal is older than `LEASE_S` (or it released the lease on a clean stop). Every write of
the stage checks first that the newest claim is still the holder's (`fenced`), so a holder that
lost the lease — stalled past the lease, and another process took over — has its next write
refused (`PartitionLost`) and becomes a standby. Why that is exact is the commit protocol's
argument, unchanged: a write that lands was checked before the newer claim, so the range it
belongs to had its intent recorded before that claim, and the new holder, which claims before it
reads the stage's checkpoints, replays exactly that range under the same tokens.

For each range, `step` will:

  1. record the intent (the range, under the lease's generation) in the checkpoint table,
     projection `read_model_stage`;
  2. recompute the range's affected keys of every maintained family version, every insert under a
     token of the range; the scratch rows (its keys, its entity stage, its aggregates' stages)
     are tagged with the range and written under its tokens too, so a replay reads what the first
     attempt staged even when the replicas moved on since (version_tables.py, `SCRATCH`);
  3. record the range done.

When it takes the lease, the holder replays the open range the last holder left (with that
holder's scratch partition) and an open backfill chunk, before anything else; then it empties
the older generations' scratch partitions.

Recomputing from the replicas' current state is exact for any key, so the stage only needs every
affected key to be recomputed at or after the change: a range's rows merged away by a later
version of the same key are recomputed with that later version's range, which carries the same
key columns (the `affects` rule, docs/read-models.md).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.commit.checkpoint import (
    DONE,
    INTENT,
    PROJECTION,
    BatchRange,
    CheckpointStore,
    Claim,
    FencedClickHouse,
    PartitionCheckpoint,
)
from projector.commit.consistency import Ceiling, ceiling_of
from projector.commit.ledger import TransactionLedger
from projector.config import ProjectorConfig
from projector.errors import PartitionLost
from projector.read_models.definitions import load_read_models
from projector.read_models.maintenance import ReadModelMaintainer, maintainer_of
from projector.read_models.versions import BUILDING

log = logging.getLogger("projector.read_models")

STAGE = "read_model_stage"  # the projection of the stage's checkpoints, lease and tokens
LEASE = ("__read_models", 0)  # the pseudo-partition whose claim is the lease
RELEASED = "(released)"  # the member of a claim that frees the lease (a clean stop)
LEASE_S = 15.0  # a holder whose last renewal is older than this has lapsed
RENEW_S = 3.0  # how often the holder renews
MAX_RANGE_OFFSETS = 20_000  # a range's offsets at most (a backlog is recomputed a range a step)
CLEAN_EVERY = 50  # ranges between two emptyings of the holder's scratch partition
WORK_PREFIX = "work|"  # a requested recompute's name in the checkpoint table
EVERY_KEY = -1  # a requested recompute's `first`: every key of the read models over its table


def lapsed(claim: Claim, age_s: float) -> bool:
    """Whether a lease claim no longer holds: released, not renewed for `LEASE_S`, or made by a
    process of this host that is gone (a SIGKILLed run's successor need not wait the lease out;
    `member_id` names the host and the pid)."""
    if claim.member == RELEASED or age_s >= LEASE_S:
        return True
    host, _, rest = claim.member.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ReadModelLease:
    """The lease: who maintains the read models (module docstring)."""

    def __init__(self, ch: ClickHouse, control_database: str, member: str, may_hold: bool) -> None:
        self.store = CheckpointStore(ch, control_database, STAGE)  # unfenced: claims must land
        self.member, self.may_hold = member, may_hold
        self.held: Claim | None = None
        self._renewed = 0.0
        self._owners = self.store.owners

    def newest(self) -> tuple[Claim | None, float]:
        """The newest claim and how many seconds ago it was last renewed."""
        rows = self.store.ch.rows(
            f"SELECT generation, member, dateDiff('millisecond', max(claimed_at), now64(3)) AS age "
            f"FROM {self._owners} WHERE `projection` = {quote(STAGE)} AND topic = {quote(LEASE[0])} "
            "GROUP BY generation, member ORDER BY generation DESC LIMIT 1"
        )
        if not rows:
            return None, float("inf")
        newest = self.store.claims([LEASE]).get(LEASE)  # of equal generations, the one that won
        return newest, int(rows[0]["age"]) / 1000

    def keep(self) -> bool:
        """Renew the lease when due, or take it when it is free or lapsed (and this process may
        hold it): whether this process holds it now."""
        now = time.monotonic()
        if self.held is not None:
            if now - self._renewed < RENEW_S:
                return True
            newest, _ = self.newest()
            if newest != self.held:
                log.warning("read models: lease lost to %s", newest)
                self.held = None
                return False
            self._claim_row(self.held)
            self._renewed = now
            return True
        if not self.may_hold:
            return False
        newest, age = self.newest()
        if newest is not None and not lapsed(newest, age):
            return False
        (claimed,) = self.store.claim([LEASE], self.member).values()
        if self.store.claims([LEASE]).get(LEASE) != claimed:
            return False  # another standby claimed the same generation, and won
        self.held, self._renewed = claimed, now
        log.info("read models: lease taken (generation %d)", claimed.generation)
        return True

    def check(self) -> None:
        """The fence: the newest claim must still be ours, else `PartitionLost`."""
        newest = self.store.claims([LEASE]).get(LEASE)
        if self.held is None or newest != self.held:
            raise PartitionLost(*LEASE, self.held, newest)

    def lost(self) -> None:
        self.held = None

    def release(self) -> None:
        """A clean stop: a claim above ours that nobody holds, so a standby takes over at once."""
        if self.held is not None and self.store.claims([LEASE]).get(LEASE) == self.held:
            self._claim_row(Claim(self.held.generation + 1, RELEASED))
        self.held = None

    def _claim_row(self, claim: Claim) -> None:
        row = {
            "projection": STAGE,
            "topic": LEASE[0],
            "partition": LEASE[1],
            "generation": claim.generation,
            "member": claim.member,
        }
        token = f"lease|{claim.generation}|{claim.member}|{time.time_ns()}"  # (not deduplicated)
        self.store.ch.execute(insert_statement(self._owners, list(row), [row], token))


@dataclass(frozen=True)
class StageRange:
    """A range the stage recomputes: `batch` names it in the checkpoint table (a source
    topic-partition, or a requested recompute) and carries its offsets; `table` is the source
    table whose replica rows it covers; `tokens` the projection its tokens are made of."""

    batch: BatchRange
    table: str
    tokens: str
    chunks: int = 0  # every key of the table's read models, in this many chunks (-1: unplanned)


class ReadModelStage:
    """The stage's position, its steps and its hand-overs (module docstring). Call from one
    thread at a time."""

    def __init__(
        self,
        ch: ClickHouse,
        maintainer_for: Callable[[ClickHouse], ReadModelMaintainer],
        replicas: CheckpointStore,
        control_database: str,
        member: str,
        may_hold: bool,
        table_of: Callable[[str], str | None],
        followed: Callable[[], Callable[[], dict[str, Ceiling]]] = lambda: dict,
        sources_of: dict[str, set[str]] | None = None,
    ) -> None:
        """`maintainer_for`: the maintainer, given the ClickHouse to write with (the stage's
        fenced one); `replicas`: the replica tables' checkpoints; `table_of`: the source table
        of a topic the read models read, or None; `followed`: makes a reader of where each read
        model's source tables stand for readers (the transaction ledger's consistency over
        them; one for the stage's thread, one for `caught_up`'s: a reader keeps state);
        `sources_of`: each read model's source tables."""
        self.lease = ReadModelLease(ch, control_database, member, may_hold)
        self.ch = FencedClickHouse(ch, self.lease.check)
        self.maintainer = maintainer_for(self.ch)
        self.maintainer.moving = self.moving
        self.replicas, self.table_of = replicas, table_of
        self.positions = CheckpointStore(self.ch, control_database, STAGE)
        self.work_table = f"{ident(control_database)}.read_model_stage_work"
        self.bounds_table = f"{ident(control_database)}.read_model_stage_bounds"
        self.followed, self._followed_here = followed(), followed()
        self.sources_of = sources_of or {}
        self._bounds: dict[str, int] = {}  # per read model, the LSN of its last ceiling recorded
        self._raw = ch
        self._control = control_database
        self._at: dict[tuple[str, int], PartitionCheckpoint] = {}
        self._steps = 0

    def create(self) -> None:
        CheckpointStore(self._raw, self._control, STAGE).create()
        create_work_table(self._raw, self._control)
        self._raw.execute(
            self._raw.topology.create_table(
                self.bounds_table,
                [
                    "model String",
                    "lsn UInt64",
                    "end_offset Int64",
                    "commit_ms Int64",
                    "generation UInt64",
                ],
                "ReplacingMergeTree",
                "lsn",
                "model",
                deduplicate=False,
            )
        )

    # ---- holding ------------------------------------------------------------------------------

    def hold(self) -> bool:
        """Keep (or take) the lease; on taking it, replay what the last holder left open."""
        before = self.lease.held
        if not self.lease.keep():
            return False
        if self.lease.held != before:
            self._take_over()
        return True

    def _take_over(self) -> None:
        assert self.lease.held is not None
        generation = self.lease.held.generation
        self.maintainer.generation = generation
        for line in self.maintainer.family_versions.ensure():
            log.info("read models: %s", line)
        self._at = self.positions.load()
        for key, checkpoint in self._at.items():
            if checkpoint.state == INTENT:
                found = self._range_of(key, checkpoint)
                if found is not None:
                    log.info("read models: replaying the open range %s", found.batch)
                    self.step(found, checkpoint.generation)
        for line in self.maintainer.finish_open_backfill():
            log.info("read models: %s", line)
        self.maintainer.drop_scratch(lambda g: g < generation)
        self._bounds = {m: c.lsn for m, c in read_ceilings(self._raw, self._control).items()}

    def lost(self) -> None:
        """A write was refused: another process holds the lease now."""
        log.warning("read models: the lease was taken over; standing by")
        self.lease.lost()

    # ---- the position -------------------------------------------------------------------------

    def start_pass(self) -> tuple[list[StageRange], dict[str, Ceiling]]:
        """The ranges to recompute now (`pending`) and, per read model, the ceiling it reaches
        once they are done (`end_pass`): where its source tables stood for readers *before*
        the ranges were read (every transaction up to it was applied, so its rows are in the
        ranges or before them); none when a range was cut short (a backlog: the ceilings wait
        for the pass that reaches the replicas)."""
        ceilings = self._unheld(self.followed())
        ranges, whole = self._pending(self._at)
        return ranges, ceilings if whole else {}

    def _unheld(self, ceilings: dict[str, Ceiling]) -> dict[str, Ceiling]:
        """The ceilings of the read models none of whose sources the stage holds (a family kept
        before waits for a replica: `FamilyVersions.waiting`); the others stay where they are."""
        waiting = self.maintainer.family_versions.waiting
        return {m: c for m, c in ceilings.items() if not self.sources_of.get(m, set()) & waiting}

    def end_pass(self, ceilings: dict[str, Ceiling]) -> None:
        """Every range of the pass is done: record the ceilings that moved (readers' positions
        of the read models, projector/commit/consistency.py `capped`)."""
        if self.lease.held is None:
            return
        generation = self.lease.held.generation
        moved = {m: c for m, c in ceilings.items() if c.lsn > self._bounds.get(m, -1)}
        rows: list[dict[str, object]] = [
            {
                "model": model,
                "lsn": ceiling.lsn,
                "end_offset": ceiling.end_offset,
                "commit_ms": ceiling.commit_ms,
                "generation": generation,
            }
            for model, ceiling in sorted(moved.items())
        ]
        if not rows:
            return
        token = f"bound|{generation}|{time.time_ns()}"  # (not deduplicated: every row lands)
        self.ch.execute(insert_statement(self.bounds_table, list(rows[0]), rows, token))
        self._bounds.update({m: c.lsn for m, c in moved.items()})

    def pending(self) -> list[StageRange]:
        return self._pending(self._at)[0]

    def _pending(
        self, positions: dict[tuple[str, int], PartitionCheckpoint]
    ) -> tuple[list[StageRange], bool]:
        """The ranges to recompute, oldest requests first: the replicas' done offsets beyond the
        stage's `positions` (a range of `MAX_RANGE_OFFSETS` at most per partition), then the
        requested recomputes not done; and whether no range was cut short."""
        ranges, whole = [], True
        waiting = self.maintainer.family_versions.waiting  # held until their family is kept
        for (topic, partition), checkpoint in sorted(self.replicas.load().items()):
            table = self.table_of(topic)
            if table is None or table in waiting:
                continue
            applied = checkpoint.first - 1 if checkpoint.state == INTENT else checkpoint.last
            at = positions.get((topic, partition))
            start = 0 if at is None else at.last + 1
            if applied >= start:
                last = min(applied, start + MAX_RANGE_OFFSETS - 1)
                whole = whole and last == applied
                ranges.append(StageRange(BatchRange(topic, partition, start, last), table, STAGE))
        for row in self._raw.rows(f"SELECT * FROM {self.work_table} FINAL ORDER BY requested_at"):
            name = f"{WORK_PREFIX}{row['id']}"
            done = positions.get((name, int(row["partition"])))
            table = self.table_of(row["topic"])
            if table is None or table in waiting:
                continue
            first, last = int(row["first"]), int(row["last"])
            if first == EVERY_KEY:  # chunk by chunk: the next one (-1 chunks: to plan)
                chunk = 0 if done is None else done.last + 1
                if last < 0 or chunk <= last:
                    batch = BatchRange(name, 0, chunk, chunk)
                    ranges.append(StageRange(batch, table, name, last + 1 if last >= 0 else -1))
                continue
            if done is None or done.state != DONE:
                batch = BatchRange(name, int(row["partition"]), first, last)
                ranges.append(StageRange(batch, table, name))
        return ranges, whole

    def _range_of(self, key: tuple[str, int], checkpoint: PartitionCheckpoint) -> StageRange | None:
        topic, partition = key
        batch = BatchRange(topic, partition, checkpoint.first, checkpoint.last)
        if not topic.startswith(WORK_PREFIX):
            table = self.table_of(topic)
            return None if table is None else StageRange(batch, table, STAGE)
        rows = self._raw.rows(
            f"SELECT topic, first, last FROM {self.work_table} FINAL "
            f"WHERE id = {quote(topic[len(WORK_PREFIX) :])}"
        )
        table = self.table_of(rows[0]["topic"]) if rows else None
        if table is None:
            return None
        every = int(rows[0]["first"]) == EVERY_KEY  # (planned before its first chunk's intent)
        return StageRange(batch, table, topic, int(rows[0]["last"]) + 1 if every else 0)

    def step(self, work: StageRange, generation: int | None = None) -> None:
        """Steps 1-3 of the module docstring for one range; `generation`: its scratch partition
        (a replay's is the generation it was started under)."""
        assert self.lease.held is not None
        held = self.lease.held.generation
        if self._steps and self._steps % CLEAN_EVERY == 0:  # between ranges, none open
            self.maintainer.drop_scratch(lambda g: g == held)
        if work.chunks < 0:  # every key: how many chunks, fixed before the first chunk's intent
            work = self._plan(work)
        if generation is None:  # 1. (a replay's intent stays as recorded: its generation
            self.positions.record(work.batch, INTENT, held)  # names the scratch it reads)
        scratch = held if generation is None else generation
        replay = generation is not None
        if work.chunks:
            chunk = (work.batch.first, work.chunks)
            self.maintainer.apply_chunk(work.batch, work.table, chunk, scratch, replay)  # 2.
        else:
            self.maintainer.apply_range(work.batch, work.table, work.tokens, scratch, replay)
        self.positions.record(work.batch, DONE, held)  # 3.
        key = (work.batch.topic, work.batch.partition)
        self._at[key] = PartitionCheckpoint(DONE, work.batch.first, work.batch.last, held)
        self._steps += 1

    def _plan(self, work: StageRange) -> StageRange:
        """Fix how many chunks a recompute of every key takes (recorded in its work row)."""
        chunks = self.maintainer.key_chunks(work.table)
        name = work.batch.topic[len(WORK_PREFIX) :]
        (row,) = self._raw.rows(f"SELECT * FROM {self.work_table} FINAL WHERE id = {quote(name)}")
        row = {**row, "last": chunks - 1}
        row.pop("requested_at", None)
        token = f"work|{name}|planned"
        self.ch.execute(insert_statement(self.work_table, list(row), [row], token))
        return StageRange(work.batch, work.table, work.tokens, chunks)

    def moving(self) -> dict[str, str]:
        """Per source table, a condition on its replica rows beyond the stage's position."""
        return beyond(self._at, self.table_of, self.maintainer.sources())

    def caught_up(self) -> bool:
        """Whether the read models have recomputed everything the replicas applied, their
        ceiling is where the replicas stand, and no version is building (read from ClickHouse:
        true whoever holds the lease; call where the stage does not run)."""
        followed = self._unheld(self._followed_here())
        at = self.positions.load()
        if any(p.state == INTENT for p in at.values()):
            return False  # a range in progress
        ranges, _ = self._pending(at)
        if ranges:
            return False
        recorded = read_ceilings(self._raw, self._control)
        if any(c.lsn > recorded[m].lsn if m in recorded else True for m, c in followed.items()):
            return False
        return not any(v["state"] == BUILDING for v in self.maintainer.family_versions.versions())


def beyond(
    positions: dict[tuple[str, int], PartitionCheckpoint],
    table_of: Callable[[str], str | None],
    tables: set[str],
) -> dict[str, str]:
    """Per table of `tables`, a condition on its replica rows (`_partition`, `_offset`) that
    holds for the rows beyond the stage's `positions`: the keys they touch have not been
    recomputed since (a check of the read models skips them; the stage recomputes them next)."""
    ends: dict[str, list[str]] = {}
    for (topic, partition), at in positions.items():
        table = None if topic.startswith(WORK_PREFIX) else table_of(topic)
        if table is not None:
            last = at.first - 1 if at.state == INTENT else at.last
            ends.setdefault(table, []).append(f"_partition = {partition}, {last}")
    moving = {}
    for table in tables:
        cases = ends.get(table, [])
        position = f"multiIf({', '.join(cases)}, -1)" if cases else "-1"
        moving[table] = f"_offset > {position}"
    return moving


def source_table_of(config: ProjectorConfig) -> Callable[[str], str | None]:
    """The source table of a topic the read models read (`prefix.schema.table`), or None."""
    head = f"{config.topic_prefix}.{config.read_model_schema}."

    def table_of(topic: str) -> str | None:
        table = topic[len(head) :]
        return table if topic.startswith(head) and table and "." not in table else None

    return table_of


def moving_now(
    config: ProjectorConfig, ch: ClickHouse, tables: set[str]
) -> Callable[[], dict[str, str]]:
    """`beyond` over the stage's positions read now (whoever holds the lease), for a check of
    the read models while a projector runs."""
    positions = CheckpointStore(ch, config.control_database, STAGE)
    return lambda: beyond(positions.load(), source_table_of(config), tables)


def stage_for(
    config: ProjectorConfig, ch: ClickHouse, replicas: CheckpointStore, member: str
) -> ReadModelStage:
    """The stage of a projector process: it may hold the lease when `maintain_read_models`."""
    table_of = source_table_of(config)

    ledger = TransactionLedger(ch, config.control_database, PROJECTION)
    models = load_read_models(config.read_models_file)
    sources = {
        model.name: [f"{config.read_model_schema}.{source}" for source in model.sources]
        for model in models
    }
    return ReadModelStage(
        ch,
        partial(maintainer_of, config),
        replicas,
        config.control_database,
        member,
        config.maintain_read_models,
        table_of,
        partial(ceiling_of, ledger, sources),
        {model.name: set(model.sources) for model in models},
    )


def read_ceilings(ch: ClickHouse, control_database: str) -> dict[str, Ceiling]:
    """Each read model's ceiling (`ReadModelStage.end_pass`); none before the first (or while
    there is no stage table yet)."""
    exists = ch.rows(
        f"SELECT count() AS n FROM system.tables WHERE database = {quote(control_database)} "
        "AND name = 'read_model_stage_bounds'"
    )
    if not int(exists[0]["n"]):
        return {}
    rows = ch.rows(
        f"SELECT model, max(b.lsn) AS top, argMax(b.end_offset, b.lsn) AS end_offset, "
        f"argMax(b.commit_ms, b.lsn) AS commit_ms FROM {ident(control_database)}"
        ".read_model_stage_bounds AS b GROUP BY model"
    )
    return {
        r["model"]: Ceiling(int(r["top"]), int(r["end_offset"]), int(r["commit_ms"])) for r in rows
    }


def create_work_table(ch: ClickHouse, control_database: str) -> None:
    ch.execute(
        ch.topology.create_table(
            f"{ident(control_database)}.read_model_stage_work",
            [
                "id String",
                "topic String",
                "`partition` Int32",
                "first Int64",
                "last Int64",
                "requested_at DateTime64(3) DEFAULT now64(3)",
            ],
            "ReplacingMergeTree",
            "",
            "id",
            deduplicate=False,
        )
    )


def request_recompute(ch: ClickHouse, control_database: str, batch: BatchRange) -> None:
    """Ask the stage to recompute the read models over a replica range it may have passed (a
    dead letter applied by `projector dlq replay`). Whoever holds the lease does it."""
    _request(ch, control_database, batch.topic, batch.partition, batch.first, batch.last)


def request_every_key(ch: ClickHouse, control_database: str, topic: str) -> None:
    """Ask the stage to recompute every key of the read models over `topic`'s table: its replica
    was replaced wholesale (`projector table reset`, a rebuild's swap or rollback), so keys it
    no longer has, and changes it skipped, reach no range. The keys are those of the replicas
    and those the read models hold, chunk by chunk (planned when the stage starts on it)."""
    _request(ch, control_database, topic, 0, EVERY_KEY, -1)


def _request(
    ch: ClickHouse, control_database: str, topic: str, partition: int, first: int, last: int
) -> None:
    create_work_table(ch, control_database)
    row = {
        "id": uuid.uuid4().hex,
        "topic": topic,
        "partition": partition,
        "first": first,
        "last": last,
    }
    table = f"{ident(control_database)}.read_model_stage_work"
    ch.execute(insert_statement(table, list(row), [row], f"work|{row['id']}"))
