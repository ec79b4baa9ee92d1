"""The commit protocol (projector/commit/checkpoint.py), crashed after each of its steps.

The checkpoint table lives in the real embedded engine (chDB on a temporary directory, in this
process); only the apply function is the test's. It inserts each batch into a target table in two
chunks, each under the batch's deduplication token for that chunk, and the target is a plain
MergeTree (not idempotent by itself, like an aggregate): a row inserted twice stays twice, unless
ClickHouse dropped the second insert by its token. So "every offset exactly once in the target"
holds only if the protocol resumed at the right offset and replayed the open intent with the same
tokens.

A "restart" is a new `CheckpointStore` and `BatchCommitter` on the same engine and database, with
nothing carried over but what ClickHouse holds. The restarted run cuts batches with a different
size limit, as a run with new messages waiting would: only the intent replay (step C) makes it cut
the interrupted batch again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from confluent_kafka import TopicPartition

from projector.clickhouse import ChdbBackend, ident, insert_statement
from projector.commit.checkpoint import (
    DONE,
    INTENT,
    PROJECTION,
    BatchCommitter,
    BatchRange,
    CheckpointStore,
    PartitionCheckpoint,
    Resume,
    acknowledge,
    cut_batch,
)
from projector.errors import CheckpointError, PartitionLost

TOPIC = "cdc.shop.orders"
TARGET = "effects"
# The partition's log: offsets with gaps, as transaction markers leave them.
LOG = [*range(0, 10), *range(12, 20), 25, 26, 30, *range(31, 40)]
FIRST_RUN_BATCH = 10  # messages per batch in the run that crashes
SECOND_RUN_BATCH = 7  # and in the restarted one: only a replay cuts the same range again


class Crash(Exception):
    """The injected failure: the process dies here."""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    # chDB holds one engine per process: one for the module, a database per test.
    backend = ChdbBackend(str(tmp_path_factory.mktemp("chdb")))
    yield backend
    backend.close()


_databases = itertools.count()


@pytest.fixture
def database(engine: ChdbBackend) -> str:
    name = f"checkpoint_test_{next(_databases)}"
    CheckpointStore(engine, name, PROJECTION).create()
    engine.execute(
        f"CREATE TABLE {ident(name)}.{TARGET} (`offset` Int64, token String) ENGINE = MergeTree "
        "ORDER BY `offset` SETTINGS non_replicated_deduplication_window = 1000"
    )
    return name


@dataclass
class Consumer:
    """Records the offsets step 5 commits to the consumer group."""

    committed: list[int] = field(default_factory=list)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.committed += [tp.offset for tp in offsets]


@dataclass
class Run:
    """One projector process: a fresh store and committer on the engine, an apply function that
    writes the batch's offsets into the target in two token-ed chunks, and a crash point."""

    engine: ChdbBackend
    database: str
    crash: str | None = None  # intent | mid-apply | before-done | before-ack
    crash_batch: int = 1  # which batch of this run (0-based) crashes
    consumer: Consumer = field(default_factory=Consumer)
    batches: list[BatchRange] = field(default_factory=list)  # every batch committed, in order
    tokens: dict[BatchRange, list[str]] = field(default_factory=dict)  # sent per batch

    def __post_init__(self) -> None:
        self.store = CheckpointStore(self.engine, self.database, PROJECTION)
        self.committer = BatchCommitter(self.store)
        record = self.store.record

        def record_with_crash(batch: BatchRange, state: str, generation: int = 0) -> None:
            if state == DONE and self._crashing("before-done"):
                raise Crash("after apply, before done")
            record(batch, state, generation)

        self.store.record = record_with_crash  # type: ignore[method-assign]

    def _crashing(self, point: str) -> bool:
        return self.crash == point and len(self.batches) - 1 == self.crash_batch

    def apply(self, batch: BatchRange, between_chunks: Callable[[], None] = lambda: None) -> None:
        """Two token-ed inserts through the fenced engine (step 3); `between_chunks` runs
        between them."""
        if self._crashing("intent"):
            raise Crash("after the intent, before any effect")
        offsets = [o for o in LOG if batch.first <= o <= batch.last]
        half = len(offsets) // 2
        fenced = self.committer.fenced(self.engine)
        for chunk, part in enumerate([offsets[:half], offsets[half:]]):
            if chunk == 1:
                between_chunks()
                if self._crashing("mid-apply"):
                    raise Crash("between two inserts of the batch")
            token = batch.token(PROJECTION, TARGET, chunk)
            self.tokens.setdefault(batch, []).append(token)
            rows = [{"offset": o, "token": token} for o in part]
            fenced.execute(
                insert_statement(
                    f"{ident(self.database)}.{TARGET}", ["offset", "token"], rows, token=token
                )
            )

    def consume(self, max_messages: int) -> Resume:
        """Steps A-C, then cut, commit and acknowledge every batch up to the log's end, as the
        runner's loop does with everything already consumed."""
        (resume,) = self.committer.assign([(TOPIC, 0)])
        buffer: list[int] = [o for o in LOG if o >= resume.offset]
        replay = resume.replay
        while buffer:
            messages, rest = cut_batch(buffer, lambda o: o, replay, max_messages, drain=True)
            buffer = list(rest)
            batch = BatchRange(TOPIC, 0, messages[0], messages[-1])
            self.batches.append(batch)
            self.committer.commit(batch, self.apply)
            if self._crashing("before-ack"):
                raise Crash("after done, before the Kafka offset commit")
            acknowledge(self.consumer, batch)  # type: ignore[arg-type]
            replay = None
        return resume


def target_counts(engine: ChdbBackend, database: str) -> dict[int, int]:
    rows = engine.rows(
        f"SELECT `offset`, count() AS n FROM {ident(database)}.{TARGET} GROUP BY `offset`"
    )
    return {int(r["offset"]): int(r["n"]) for r in rows}


# --- crash after each step, then restart --------------------------------------------------


@pytest.mark.parametrize("crash", ["intent", "mid-apply", "before-done"])
def test_a_crash_inside_a_batch_replays_its_intent_with_the_same_tokens(
    engine: ChdbBackend, database: str, crash: str
) -> None:
    first = Run(engine, database, crash=crash)
    with pytest.raises(Crash):
        first.consume(FIRST_RUN_BATCH)
    done, interrupted = first.batches
    assert (done.first, done.last, interrupted.first, interrupted.last) == (0, 9, 12, 26)
    assert first.consumer.committed == [10]  # step 5 ran for the finished batch only

    second = Run(engine, database)
    resume = second.consume(SECOND_RUN_BATCH)

    # B: at the intent's first offset; C: replay exactly its range, then cut as configured
    assert resume == Resume(TOPIC, 0, 12, BatchRange(TOPIC, 0, 12, 26))
    assert second.batches[0] == interrupted
    assert [(b.first, b.last) for b in second.batches[1:]] == [(30, 36), (37, 39)]
    # the replay sends the tokens the crashed run sent (and the rest of the batch's)
    replayed = second.tokens[interrupted]
    assert replayed == [interrupted.token(PROJECTION, TARGET, c) for c in (0, 1)]
    assert first.tokens.get(interrupted, []) == replayed[: len(first.tokens.get(interrupted, []))]
    # the effect: every offset of the log exactly once
    assert target_counts(engine, database) == dict.fromkeys(LOG, 1)
    assert second.store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 37, 39)}


def test_a_crash_after_done_resumes_after_the_batch_whatever_kafka_was_told(
    engine: ChdbBackend, database: str
) -> None:
    first = Run(engine, database, crash="before-ack")
    with pytest.raises(Crash):
        first.consume(FIRST_RUN_BATCH)
    assert first.consumer.committed == [10]  # the consumer group still says 10
    assert first.store.load()[(TOPIC, 0)] == PartitionCheckpoint(DONE, 12, 26)

    second = Run(engine, database)
    resume = second.consume(SECOND_RUN_BATCH)

    assert resume == Resume(TOPIC, 0, 27, None)  # the checkpoint table, not Kafka, decides
    assert [(b.first, b.last) for b in second.batches] == [(30, 36), (37, 39)]
    assert target_counts(engine, database) == dict.fromkeys(LOG, 1)


def test_a_crash_in_every_batch_still_applies_each_offset_once(
    engine: ChdbBackend, database: str
) -> None:
    """Crash in the second batch of every run (the first one is often a replay), at each point in
    turn, until a run reaches the end of the log."""
    points = itertools.cycle(["mid-apply", "before-done", "intent", "before-ack"])
    for restarts in itertools.count():
        assert restarts < 20, "the log was never fully applied"
        run = Run(engine, database, crash=next(points), crash_batch=1)
        try:
            run.consume(3)
            break
        except Crash:
            continue
    assert target_counts(engine, database) == dict.fromkeys(LOG, 1)


def test_a_clean_run_commits_kafka_offsets_after_each_batch(
    engine: ChdbBackend, database: str
) -> None:
    run = Run(engine, database)
    assert run.consume(FIRST_RUN_BATCH) == Resume(TOPIC, 0, 0, None)
    assert [(b.first, b.last) for b in run.batches] == [(0, 9), (12, 26), (30, 39)]
    assert run.consumer.committed == [10, 27, 40]
    assert target_counts(engine, database) == dict.fromkeys(LOG, 1)


# --- step 1: the batch must be the next one -----------------------------------------------


def committer_at(engine: ChdbBackend, database: str, state: str, first: int, last: int) -> Run:
    run = Run(engine, database)
    run.store.record(BatchRange(TOPIC, 0, first, last), state)
    run.committer = BatchCommitter(run.store)
    run.committer.assign([(TOPIC, 0)])
    return run


@pytest.mark.parametrize(
    ("state", "first", "last", "problem"),
    [
        (DONE, 9, 15, "overlaps the last applied offset 9"),
        (DONE, 5, 9, "overlaps the last applied offset 9"),
        (INTENT, 10, 18, r"open intent 10-19 on cdc\.shop\.orders\[0\] must be replayed exactly"),
        (INTENT, 10, 20, "open intent 10-19"),
        (INTENT, 11, 19, "open intent 10-19"),
        (INTENT, 20, 29, "open intent 10-19"),
    ],
)
def test_a_batch_that_is_not_the_next_one_is_refused_before_any_record(
    engine: ChdbBackend, database: str, state: str, first: int, last: int, problem: str
) -> None:
    recorded = (0, 9) if state == DONE else (10, 19)
    run = committer_at(engine, database, state, *recorded)
    applied: list[BatchRange] = []
    with pytest.raises(CheckpointError, match=problem):
        run.committer.commit(BatchRange(TOPIC, 0, first, last), applied.append)
    assert applied == []
    assert run.store.load()[(TOPIC, 0)] == PartitionCheckpoint(state, *recorded)


@pytest.mark.parametrize(
    ("state", "first", "last"),
    [(DONE, 10, 19), (DONE, 14, 19), (INTENT, 10, 19)],  # next; after a gap; the replay
)
def test_the_next_batch_after_a_gap_or_the_exact_replay_is_accepted(
    engine: ChdbBackend, database: str, state: str, first: int, last: int
) -> None:
    recorded = (0, 9) if state == DONE else (10, 19)
    run = committer_at(engine, database, state, *recorded)
    applied: list[BatchRange] = []
    run.committer.commit(BatchRange(TOPIC, 0, first, last), applied.append)
    assert applied == [BatchRange(TOPIC, 0, first, last)]
    assert run.store.load()[(TOPIC, 0)] == PartitionCheckpoint(DONE, first, last)
    assert run.committer.resume_offset(TOPIC, 0) == last + 1


def test_the_intent_is_recorded_before_apply_runs(engine: ChdbBackend, database: str) -> None:
    run = Run(engine, database)
    run.committer.assign([(TOPIC, 0)])
    seen: list[dict[tuple[str, int], PartitionCheckpoint]] = []
    run.committer.commit(BatchRange(TOPIC, 0, 0, 4), lambda _: seen.append(run.store.load()))
    assert seen == [{(TOPIC, 0): PartitionCheckpoint(INTENT, 0, 4)}]


@pytest.mark.parametrize(("first", "last"), [(5, 4), (-1, 3)])
def test_offsets_must_grow_inside_a_batch(first: int, last: int) -> None:
    with pytest.raises(CheckpointError, match="offsets must grow inside a batch"):
        BatchRange(TOPIC, 0, first, last)


# --- step A: checkpoints are read afresh on assignment ------------------------------------


def test_assign_reads_what_another_member_applied_since(engine: ChdbBackend, database: str) -> None:
    ours = Run(engine, database)
    ours.committer.assign([(TOPIC, 0)])
    ours.committer.commit(BatchRange(TOPIC, 0, 0, 9), ours.apply)
    # the partition moves to another member, which applies two more batches
    theirs = Run(engine, database)
    theirs.committer.assign([(TOPIC, 0)])
    theirs.committer.commit(BatchRange(TOPIC, 0, 12, 19), theirs.apply)
    theirs.committer.commit(BatchRange(TOPIC, 0, 25, 31), theirs.apply)
    # and back to us, whose cache still says 0-9 done
    assert ours.committer.resume_offset(TOPIC, 0) == 10
    assert ours.committer.assign([(TOPIC, 0)]) == [Resume(TOPIC, 0, 32, None)]
    with pytest.raises(CheckpointError, match="overlaps the last applied offset 31"):
        ours.committer.commit(BatchRange(TOPIC, 0, 12, 19), ours.apply)
    ours.committer.commit(BatchRange(TOPIC, 0, 32, 39), ours.apply)
    assert target_counts(engine, database) == dict.fromkeys(LOG, 1)


def test_assign_forgets_a_cached_checkpoint_the_table_no_longer_has(
    engine: ChdbBackend, database: str
) -> None:
    run = Run(engine, database)
    run.committer.assign([(TOPIC, 0)])
    run.committer.commit(BatchRange(TOPIC, 0, 0, 9), run.apply)
    engine.execute(f"TRUNCATE TABLE {ident(database)}.checkpoints")  # e.g. a reset projection
    assert run.committer.assign([(TOPIC, 0)]) == [Resume(TOPIC, 0, 0, None)]
    assert run.committer.resume_offset(TOPIC, 0) is None
    run.committer.commit(BatchRange(TOPIC, 0, 0, 4), lambda _: None)


def test_assign_reads_only_the_assigned_partitions(engine: ChdbBackend, database: str) -> None:
    run = Run(engine, database)
    for partition, state in [(0, DONE), (1, INTENT), (2, DONE)]:
        run.store.record(BatchRange(TOPIC, partition, 5, 9), state)
    run.store.record(BatchRange("cdc.shop.customers", 0, 0, 2), DONE)
    assert run.committer.assign([(TOPIC, 1), (TOPIC, 0), (TOPIC, 7)]) == [
        Resume(TOPIC, 1, 5, BatchRange(TOPIC, 1, 5, 9)),
        Resume(TOPIC, 0, 10, None),
        Resume(TOPIC, 7, 0, None),
    ]
    assert set(run.store.load([(TOPIC, 2), ("cdc.shop.customers", 0)])) == {
        (TOPIC, 2),
        ("cdc.shop.customers", 0),
    }
    assert run.store.load([]) == {}


# --- the checkpoint table: the newest record wins -----------------------------------------


def test_a_late_record_of_an_older_batch_does_not_move_the_checkpoint_back(
    engine: ChdbBackend, database: str
) -> None:
    """A member that lost the partition may still write a record of an older batch; the record
    of the furthest batch must stay the checkpoint (versions, not insertion order, decide)."""
    store = CheckpointStore(engine, database, PROJECTION)
    store.record(BatchRange(TOPIC, 0, 10, 19), INTENT)
    store.record(BatchRange(TOPIC, 0, 10, 19), DONE)
    store.record(BatchRange(TOPIC, 0, 10, 19), INTENT)  # a retry whose done had landed
    store.record(BatchRange(TOPIC, 0, 0, 9), DONE)  # the old owner, late
    assert store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 10, 19)}


def test_re_recording_the_same_state_is_kept_and_harmless(
    engine: ChdbBackend, database: str
) -> None:
    store = CheckpointStore(engine, database, PROJECTION)
    for _ in range(2):
        store.record(BatchRange(TOPIC, 0, 0, 9), INTENT)
        store.record(BatchRange(TOPIC, 0, 0, 9), DONE)
    # the checkpoint table has no deduplication window: the repeated records all landed
    rows = engine.rows(f"SELECT count() AS n FROM {ident(database)}.checkpoints")
    assert int(rows[0]["n"]) == 4
    assert store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 0, 9)}


def test_checkpoints_of_another_projection_are_not_ours(engine: ChdbBackend, database: str) -> None:
    CheckpointStore(engine, database, "rebuild").record(BatchRange(TOPIC, 0, 0, 99), DONE)
    ours = CheckpointStore(engine, database, PROJECTION)
    assert ours.load() == {}
    assert BatchCommitter(ours).assign([(TOPIC, 0)]) == [Resume(TOPIC, 0, 0, None)]


def test_tokens_name_the_projection_target_partition_range_and_chunk() -> None:
    batch = BatchRange(TOPIC, 3, 10, 19)
    tokens = {
        batch.token(PROJECTION, TARGET, 0),
        batch.token(PROJECTION, TARGET, 1),
        batch.token(PROJECTION, "other", 0),
        batch.token("rebuild", TARGET, 0),
        BatchRange(TOPIC, 4, 10, 19).token(PROJECTION, TARGET, 0),
        BatchRange(TOPIC, 3, 10, 18).token(PROJECTION, TARGET, 0),
        BatchRange(TOPIC, 3, 11, 19).token(PROJECTION, TARGET, 0),
        BatchRange("cdc.shop.customers", 3, 10, 19).token(PROJECTION, TARGET, 0),
    }
    assert len(tokens) == 8
    assert batch.token(PROJECTION, TARGET, 0) == BatchRange(TOPIC, 3, 10, 19).token(
        PROJECTION, TARGET, 0
    )


# --- the fence: a member whose partition another member claimed writes nothing more --------


def test_a_batch_of_a_partition_claimed_since_is_refused_before_its_intent(
    engine: ChdbBackend, database: str
) -> None:
    stale = Run(engine, database)
    stale.committer.assign([(TOPIC, 0)])
    stale.committer.commit(BatchRange(TOPIC, 0, 0, 9), stale.apply)
    # the group moved the partition while the stale member waited for ClickHouse
    owner = Run(engine, database)
    owner.committer.assign([(TOPIC, 0)])
    owner.committer.commit(BatchRange(TOPIC, 0, 12, 26), owner.apply)

    applied: list[BatchRange] = []
    with pytest.raises(PartitionLost, match=r"cdc\.shop\.orders\[0\] is no longer ours"):
        stale.committer.commit(BatchRange(TOPIC, 0, 12, 19), applied.append)
    assert applied == []
    assert stale.store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 12, 26)}


def test_a_claim_between_two_chunks_stops_the_stale_member_and_the_owner_replays_its_intent(
    engine: ChdbBackend, database: str
) -> None:
    stale = Run(engine, database)
    stale.committer.assign([(TOPIC, 0)])
    owner = Run(engine, database)
    resumes: list[Resume] = []
    batch = BatchRange(TOPIC, 0, 0, 9)
    with pytest.raises(PartitionLost):
        stale.committer.commit(
            batch,
            lambda b: stale.apply(b, lambda: resumes.extend(owner.committer.assign([(TOPIC, 0)]))),
        )
    # the new owner claimed after the stale intent landed: it replays exactly that range
    assert resumes == [Resume(TOPIC, 0, 0, batch)]
    assert target_counts(engine, database) == dict.fromkeys(range(5), 1)  # chunk 1 never landed
    owner.committer.commit(batch, owner.apply)
    owner.committer.commit(BatchRange(TOPIC, 0, 12, 39), owner.apply)
    assert target_counts(engine, database) == dict.fromkeys(LOG, 1)


def test_a_batch_cut_under_an_earlier_claim_of_our_own_is_refused_before_its_intent(
    engine: ChdbBackend, database: str
) -> None:
    """The run loop reads ahead: batches are cut (under the claim of the moment) before they are
    committed. A batch refused at the fence makes the member claim the partition again and
    resume from its checkpoint; a batch cut before that re-claim, further along the partition,
    must then be refused too, not committed under the new claim from the old position (it would
    skip the refused batch's offsets)."""
    run = Run(engine, database)
    run.committer.assign([(TOPIC, 0)])
    cut_under = run.committer.claims[(TOPIC, 0)]
    run.committer.commit(BatchRange(TOPIC, 0, 0, 9), run.apply, cut_under)
    ahead = BatchRange(TOPIC, 0, 12, 19)  # cut, waiting behind a batch that the fence refused
    run.committer.assign([(TOPIC, 0)])  # ... so the member claimed the partition again
    applied: list[BatchRange] = []
    with pytest.raises(PartitionLost, match=r"cdc\.shop\.orders\[0\] is no longer ours"):
        run.committer.commit(ahead, applied.append, cut_under)
    assert applied == []
    assert run.store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 0, 9)}
    # under the claim it holds now, the same range goes through
    run.committer.commit(ahead, run.apply, run.committer.claims[(TOPIC, 0)])
    assert run.store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 12, 19)}


def test_a_batch_cut_under_a_claim_another_member_overtook_writes_nothing(
    engine: ChdbBackend, database: str
) -> None:
    """The fence checks the claim a batch was cut under at every step (here: before the intent)."""
    run = Run(engine, database)
    run.committer.assign([(TOPIC, 0)])
    cut_under = run.committer.claims[(TOPIC, 0)]
    Run(engine, database).committer.assign([(TOPIC, 0)])  # the group moved the partition
    applied: list[BatchRange] = []
    with pytest.raises(PartitionLost):
        run.committer.commit(BatchRange(TOPIC, 0, 0, 9), applied.append, cut_under)
    assert applied == [] and run.store.load() == {}


def test_a_stale_members_late_records_never_become_the_checkpoint(
    engine: ChdbBackend, database: str
) -> None:
    """Records are ordered by the writer's generation first: an intent the stale member checked
    just before the newer claim, landing after it with far higher offsets, loses to the owner's."""
    stale = Run(engine, database)
    stale.committer.assign([(TOPIC, 0)])
    owner = Run(engine, database)
    owner.committer.assign([(TOPIC, 0)])
    owner.committer.commit(BatchRange(TOPIC, 0, 0, 9), owner.apply)
    stale_generation = stale.committer.claims[(TOPIC, 0)].generation
    stale.store.record(BatchRange(TOPIC, 0, 0, 39), INTENT, stale_generation)  # late
    assert owner.store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 0, 9)}
    engine.execute(f"OPTIMIZE TABLE {ident(database)}.checkpoints FINAL")  # merges agree
    assert owner.store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 0, 9)}


def test_a_checkpoint_table_from_before_the_fence_is_migrated(engine: ChdbBackend) -> None:
    name = f"checkpoint_test_{next(_databases)}"
    engine.execute(f"CREATE DATABASE {ident(name)}")
    engine.execute(
        f"CREATE TABLE {ident(name)}.checkpoints (`projection` String, topic String, "
        "`partition` Int32, first_offset Int64, last_offset Int64, state LowCardinality(String), "
        "version UInt64, recorded_at DateTime64(3) DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree(version) ORDER BY (`projection`, topic, `partition`)"
    )
    old = CheckpointStore(engine, name, PROJECTION)
    old.ch.execute(
        f"INSERT INTO {ident(name)}.checkpoints (`projection`, topic, `partition`, first_offset, "
        f"last_offset, state, version) VALUES ('{PROJECTION}', '{TOPIC}', 0, 10, 19, 'done', 39)"
    )
    store = CheckpointStore(engine, name, PROJECTION)
    store.create()
    store.create()  # idempotent
    assert store.load() == {(TOPIC, 0): PartitionCheckpoint(DONE, 10, 19)}
    run = Run(engine, name)
    assert run.committer.assign([(TOPIC, 0)]) == [Resume(TOPIC, 0, 20, None)]
