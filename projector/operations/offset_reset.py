"""`projector reset SCHEMA.TABLE --to-offset N | --to-time T`: a replica table re-reads its topic
from another offset while the projector keeps serving it and every other table.

Why moving back is exact, for each thing a batch writes:
  1. The replica. A row's `_version` is its event's offset (projector/replicas/catalog.py), so a re-read
     event writes the version it wrote the first time. Each key's rows written since (higher
     offsets) win over it under `FINAL`, and at an equal version it is the same row again (a
     pure function of the messages and the versions below them; its inserts may even be dropped
     by their deduplication tokens). A delete and a truncate are rows too, deletion markers at
     their offsets, and nothing removes them (no `CLEANUP` merges): a re-read insert of a key
     deleted later stays older than its marker, and the key stays deleted. So the replica's
     `FINAL` contents do not change at any point of the re-read, only its duplicates, which
     merge away. (An unchanged TOAST column re-read takes the key's newest stored value below
     the batch, or its newest when merges left none below: a re-read row may hold a newer
     value, but only a row that a newer row of the key beats; the key's newest row is re-read
     with the same value.)
  2. The read models it feeds. A batch's maintenance recomputes the keys it touched from the
     replicas and feeds each aggregate the difference from the stored entity row
     (projector/read_models/maintenance.py). The replicas do not change (1), so every recompute equals
     what is stored and every difference is zero: they stay exact, without a rebuild.
  3. The transaction ledger counts applied events per transaction; the re-read events were
     counted when first applied. The runner counts nothing for them (checkpoint.py, R2), so a
     watermark never passes a transaction whose events are still to come.
  4. Not exact, so refused: a table without a primary key. Its replica is append-only, a row
     per event, and a re-read would append the events again (`projector rebuild TABLE --from
     kafka` rebuilds it).
  5. Dead letters: a message dead-lettered the first time is dead-lettered again; the DLQ table
     keeps one row per offset, the DLQ topic gets it again.
Moving forward skips the events in between: the replica keeps those keys as they were, the read
models follow the replica, and transactions with skipped events stay incomplete in the ledger
(the read models' watermarks stop at the first). A reset back to where it was re-reads them,
exactly as above (every skipped event is older than the rows applied since, or the key's newest
and then right): that, or `projector rebuild TABLE --from kafka`, repairs it; `projector verify`
shows the drift.

With a projector running (a ClickHouse server, and members in the consumer group), `reset` will:
  1. pause the table (unless it is paused already) and wait until the projector reports it
     paused: no batch of it in flight, no open intent (`projector pause`);
  2. read each partition's resume offset (it holds still now) and move it, checkpoint.py R1-R3;
  3. read the checkpoints back: each partition must resume at its new offset (a rebalance racing
     the move could have let a member record over it: run the command again);
  4. resume the table if step 1 paused it, and wait until the projector reports it resumed: it
     positions each partition from its checkpoint again (steps A-C) before it resumes it.
With chDB (one process owns the data: no projector runs beside the command) or no member in the
group, only steps 2 and 3: the next `projector run` starts there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import KafkaException, TopicPartition

from projector import kafka
from projector.clickhouse import ClickHouse, quote
from projector.commit.checkpoint import PROJECTION, CheckpointStore
from projector.config import ProjectorConfig, open_backend
from projector.errors import ResetRefused
from projector.operations.pauses import TablePauses
from projector.operations.replica_rebuild_progress import open_replica_rebuilds

MEMBER = "projector reset"


@dataclass(frozen=True)
class PartitionMove:
    """One partition's move: from where it resumes now to `target`, within Kafka's retained
    offsets [low, high) (high: the end, where the next message goes)."""

    partition: int
    current: int
    target: int
    low: int
    high: int

    @property
    def replayed(self) -> int:
        return max(0, self.current - self.target)

    @property
    def skipped(self) -> int:
        return max(0, self.target - self.current)


@dataclass(frozen=True)
class ResetPlan:
    table: str  # SCHEMA.TABLE
    topic: str
    moves: list[PartitionMove]

    @property
    def forward(self) -> bool:
        return any(m.skipped for m in self.moves)

    def lines(self) -> list[str]:
        """The plan as the prompt and `--dry-run` show it."""
        lines = [f"{self.table} (topic {self.topic}):"]
        for m in self.moves:
            what = (
                f"re-reads {m.replayed:,} event(s)"
                if m.replayed
                else f"SKIPS {m.skipped:,} event(s)"
                if m.skipped
                else "stays"
            )
            lines.append(
                f"  partition {m.partition}: offset {m.current:,} -> {m.target:,}  "
                f"{what}  (Kafka retains {m.low:,} to {m.high:,})"
            )
        replayed = sum(m.replayed for m in self.moves)
        if replayed:
            lines.append(
                f"{replayed:,} event(s) re-read: the replica and the read models it "
                "feeds stay exact meanwhile (newer rows win over re-read ones)"
            )
        if self.forward:
            skipped = sum(m.skipped for m in self.moves)
            back = ", ".join(f"{m.partition}: {m.current}" for m in self.moves if m.skipped)
            lines += [
                f"WARNING: moving forward skips {skipped:,} event(s): the replica and the read "
                "models it feeds miss them, and transactions among them stay incomplete (read "
                "models' watermarks stop there).",
                f"  `projector verify {self.table}` shows the drift; `projector reset "
                f"{self.table} --to-offset <old>` (old offsets: {back}) re-reads them exactly, "
                f"or `projector rebuild {self.table} --from kafka` rebuilds the table.",
            ]
        return lines


def parse_time(text: str) -> datetime:
    """An ISO-8601 time; without a zone it is UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ResetRefused(
            f"--to-time {text!r} is not an ISO-8601 time (e.g. 2025-05-01T12:00:00Z, "
            "2025-05-01 14:00+02:00; without a zone it is UTC)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def millis_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def resolve_target(
    topic: str,
    partition: int,
    low: int,
    high: int,
    to_offset: int | None = None,
    when_ms: int | None = None,
    found: int | None = None,
    earliest_ms: int | None = None,
) -> int:
    """The offset a partition moves to: `to_offset`, or for a time `when_ms` the first offset
    at or after it that Kafka `found` (-1: none, the end), refused when retention deleted
    messages that may be newer than the time (the earliest retained one, at `low` > 0, is from
    `earliest_ms` > `when_ms`)."""
    if to_offset is not None:
        if not low <= to_offset <= high:
            raise ResetRefused(
                f"offset {to_offset} is outside what Kafka retains of {topic}[{partition}]: "
                f"{low} to {high} ({high} is the end: nothing re-read)"
            )
        return to_offset
    assert when_ms is not None and found is not None
    target = high if found < 0 else found
    if target == low and low > 0 and earliest_ms is not None and earliest_ms > when_ms:
        raise ResetRefused(
            f"{millis_text(when_ms)} is before what Kafka retains of {topic}[{partition}]: its "
            f"earliest message (offset {low}) is from {millis_text(earliest_ms)}, older ones "
            f"were deleted; `--to-offset {low}` re-reads from there"
        )
    return min(max(target, low), high)


def plan(
    table: str,
    topic: str,
    retained: dict[int, tuple[int, int]],
    current: dict[int, int | None],
    targets: dict[int, int],
) -> ResetPlan:
    """The moves of the given partitions; one that never applied anything is at its earliest
    retained offset (where it would start)."""
    moves = []
    for partition, target in sorted(targets.items()):
        low, high = retained[partition]
        at = current.get(partition)
        moves.append(PartitionMove(partition, low if at is None else at, target, low, high))
    return ResetPlan(table, topic, moves)


@dataclass(frozen=True)
class PreparedReset:
    """A reset ready to move: its plan, the live checkpoints, and the pause tables when a
    projector runs beside the command (None: chDB, whose data only one process opens, or no
    member in the group)."""

    plan: ResetPlan
    checkpoints: CheckpointStore
    pauses: TablePauses | None


def prepare(
    config: ProjectorConfig,
    table: str,
    to_offset: int | None,
    to_time: str | None,
    partitions: list[int] | None,
) -> PreparedReset:
    """The plan to move `table` (SCHEMA.TABLE) to `to_offset`, or to the first event at or after
    `to_time`, on `partitions` (None or empty: every one); ResetRefused when it cannot be done
    as asked (an unknown table or partition, an offset or time Kafka no longer holds, item 4 of
    the module docstring, a rebuild chasing the table)."""
    when_ms = None if to_time is None else int(parse_time(to_time).timestamp() * 1000)
    topic = kafka.table_topic(config.topic_prefix, table)
    retained, found, earliest = kafka_positions(config, topic, table, partitions, when_ms)
    ch, checkpoints, pauses = open_stores(config)
    keys = [(topic, p) for p in retained]
    current: dict[int, int | None] = {
        p: c.resume_offset for (_, p), c in checkpoints.load(keys).items()
    }
    targets = {
        p: resolve_target(topic, p, low, high, to_offset, when_ms, found.get(p), earliest.get(p))
        for p, (low, high) in retained.items()
    }
    the_plan = plan(table, topic, retained, current, targets)
    refuse_unsafe(config, ch, the_plan)
    return PreparedReset(the_plan, checkpoints, pauses)


def kafka_positions(
    config: ProjectorConfig, topic: str, table: str, only: list[int] | None, when_ms: int | None
) -> tuple[dict[int, tuple[int, int]], dict[int, int], dict[int, int]]:
    """Per partition of `topic` (or of `only`): Kafka's retained offsets (low, end); for a time,
    the first offset at or after it (-1: none) and the earliest retained message's timestamp."""
    consumer = kafka.consumer(
        config.kafka_bootstrap, f"{config.group_id}-reset", enable_auto_commit=False
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise ResetRefused(
                f"unknown table {table}: Kafka has no topic {topic} (name the source table as "
                "SCHEMA.TABLE; `projector status` lists them)"
            )
        partitions = sorted(metadata.partitions)
        if only:
            unknown = sorted(set(only) - set(partitions))
            if unknown:
                raise ResetRefused(
                    f"{topic} has no partition {', '.join(map(str, unknown))} (its partitions: "
                    f"{', '.join(map(str, partitions))})"
                )
            partitions = sorted(set(only))
        retained = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in partitions
        }
        found: dict[int, int] = {}
        earliest: dict[int, int] = {}
        if when_ms is not None:
            asked = [TopicPartition(topic, p, when_ms) for p in partitions]
            found = {
                tp.partition: tp.offset for tp in consumer.offsets_for_times(asked, timeout=10)
            }
            for p, (low, high) in retained.items():
                if low > 0 and found[p] == low and high > low:  # did retention delete newer ones?
                    consumer.assign([TopicPartition(topic, p, low)])
                    message = consumer.consume(1, timeout=10)
                    if message and message[0].error() is None:
                        earliest[p] = message[0].timestamp()[1]
                    consumer.unassign()
    except KafkaException as exc:
        raise ResetRefused(f"cannot read {topic}'s offsets from Kafka: {exc}") from exc
    finally:
        consumer.close()
    return {p: (int(lo), int(hi)) for p, (lo, hi) in retained.items()}, found, earliest


def open_stores(config: ProjectorConfig) -> tuple[ClickHouse, CheckpointStore, TablePauses | None]:
    """ClickHouse, the checkpoint store, and the pause tables when a projector runs beside the
    command (None: chDB, whose data only one process opens, or no member in the group)."""
    ch = open_backend(config)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    checkpoints.create()
    if config.backend == "chdb":
        return ch, checkpoints, None
    admin = kafka.admin(config.kafka_bootstrap)
    futures = admin.describe_consumer_groups([config.group_id], request_timeout=10)
    members = futures[config.group_id].result(timeout=15).members
    if not members:
        return ch, checkpoints, None
    pauses = TablePauses(ch, config.control_database)
    pauses.create()
    return ch, checkpoints, pauses


def refuse_unsafe(config: ProjectorConfig, ch: ClickHouse, the_plan: ResetPlan) -> None:
    """Refuses (ResetRefused) a table whose replica cannot be moved as asked: none yet,
    append-only moved back (item 4), or a rebuild chasing it (its shadow follows the live
    position, which must only grow)."""
    schema, name = the_plan.table.split(".", 1)
    database = config.replica_prefix + schema
    engines = ch.rows(
        f"SELECT engine FROM system.tables WHERE database = {quote(database)} "
        f"AND name = {quote(name)}"
    )
    if not engines:
        raise ResetRefused(
            f"unknown table {the_plan.table}: ClickHouse has no replica {database}.{name} (the "
            "projector has applied nothing of it yet)"
        )
    if "Replacing" not in engines[0]["engine"] and any(m.replayed for m in the_plan.moves):
        raise ResetRefused(
            f"{the_plan.table} has no primary key: its replica keeps every event, and re-reading "
            f"would add them again; `projector rebuild {the_plan.table} --from kafka` rebuilds it"
        )
    rebuilds = open_replica_rebuilds(config, ch)
    chasing = [j for j in rebuilds.job_store.jobs() if j.table == the_plan.table]
    if chasing:
        job = chasing[-1]
        raise ResetRefused(
            f"a rebuild of {the_plan.table} (job {job.id}, {job.state}) keeps a table following "
            f"the live one: let it finish and `projector rebuild {the_plan.table} --drop-old` first"
        )


def wait_for(
    done: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        sleep(poll_s)
    return True


def move(
    plan: ResetPlan,
    store: CheckpointStore,
    pauses: TablePauses | None,
    timeout_s: float = 60,
    say: Callable[[str], None] = lambda line: None,
) -> ResetPlan:
    """Steps 1-4 of the module docstring (`pauses` None: no projector runs, steps 2-3). Returns
    the plan as done (positions re-read once the table held still)."""
    table, keys = plan.table, [(plan.topic, m.partition) for m in plan.moves]
    we_paused = False
    if pauses is not None:  # 1.
        if table not in pauses.wanted():
            pauses.want(table, True)
            we_paused = True
            say(f"pausing {table} ...")
        if not wait_for(lambda: table in pauses.honoured(), timeout_s):
            if we_paused:
                pauses.want(table, False)
            raise ResetRefused(
                f"the running projector did not pause {table} within {timeout_s:.0f} s (is "
                "`projector run` running and keeping up? `projector status`); nothing moved"
            )
    try:
        found = store.load(keys)  # 2.
        done = ResetPlan(
            table,
            plan.topic,
            [
                PartitionMove(
                    m.partition,
                    found[k].resume_offset if k in found else m.low,
                    m.target,
                    m.low,
                    m.high,
                )
                for m, k in zip(plan.moves, keys, strict=True)
            ],
        )
        for m in done.moves:
            store.reset_to(plan.topic, m.partition, m.target, m.current, MEMBER)
        after = store.load(keys)  # 3.
        wrong = [
            m
            for m, k in zip(done.moves, keys, strict=True)
            if k not in after or after[k].resume_offset != m.target
        ]
        if wrong:
            raise ResetRefused(
                "a member recorded over the reset (a rebalance raced it): partition(s) "
                f"{', '.join(str(m.partition) for m in wrong)} did not move; run it again"
            )
    finally:
        if we_paused:  # 4.
            assert pauses is not None
            pauses.want(table, False)
    if we_paused:
        assert pauses is not None
        say(f"resuming {table} ...")
        if not wait_for(lambda: table not in pauses.honoured(), timeout_s):
            raise ResetRefused(
                f"moved, but the running projector did not resume {table} within "
                f"{timeout_s:.0f} s; it re-reads from the new offsets when it does"
            )
    return done
