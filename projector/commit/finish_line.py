"""When a run that was asked to finish may exit: the finish line of `projector run --until-...`.

A run that should end fixes its finish line ONCE, when it is asked to finish, and exits as soon as
everything before the line is applied. A line read afresh at every check moves: with Debezium's
heartbeat transactions the transaction topic's end offset grows every heartbeat, and a run that
must reach "the end, now" while checking a few dozen partitions one after another never does.

Three lines:

- `--until-kafka-end`: the end offset of every partition of every subscribed topic, read when the
  run starts. Everything in Kafka then is applied; Kafka may not hold all of Postgres yet.
- `--until-lsn LSN`: every change committed in Postgres up to source position LSN (a writer's
  `pg_current_wal_lsn()` after its commit) is applied.
- `--until-caught-up`: `--until-lsn` with the source's WAL insert position when the command starts
  (`source_position`): caught up with Postgres as of that moment.

Why the LSN line is sound. Debezium (`provide.transaction.metadata`) writes an END event per
transaction to the transaction topic (one partition) with the transaction's LSN — the end of its
commit record, where logical decoding places a commit — and, per table, how many change events it
emitted; the projector records both in its ledger (projector/commit/ledger.py), and per transaction
and table the events applied or dead-lettered.

  1. A transaction committed before the target position T ended its commit record at or before T
     (`pg_current_wal_insert_lsn()` is past every inserted record; the insert position, not the
     write position, because an asynchronous commit returns before its WAL is written).
  2. Logical decoding hands Debezium transactions in commit order, so their END events sit on the
     transaction topic in that order, with growing LSNs.
  3. The **fence** is the first END recorded with LSN >= T. By 1 and 2, every transaction committed
     before T has its END at or before the fence (Debezium's heartbeat action query commits a
     transaction every `heartbeat.interval.ms`, so a fence comes even when the application is idle).
  4. Kafka does not promise that records a producer sent to different partitions become visible in
     the order sent, so "the fence is visible" does not yet mean "the transactions' change events
     are": the counts close that gap. Caught up needs every transaction ended at or before the
     fence to have, on every projected table, as many events applied or dead-lettered as its END
     counted. Then every change committed before T is applied (or in the DLQ, with its reason).
  5. Events without a transaction — snapshot reads — are not counted: when the fence is found, the
     end offsets of all subscribed partitions are read once, and those must be applied too. An
     initial snapshot is emitted before streaming begins, so before the fence. An incremental
     snapshot still running (a table just added to the capture) is not waited for.

`FinishLine` runs these steps against a `Progress` (what Kafka, the consumer group's checkpoints
and the ledger say), so the rule is tested with fakes (tests/unit/test_finish_line.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from projector.commit.transactions import Unfinished, lsn_text, parse_lsn
from projector.errors import ConfigError, ProjectorError

TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True)
class Finish:
    """What a run asked to finish waits for: a source LSN, or Kafka's end when it starts."""

    lsn: int | None = None
    kafka_end: bool = False

    def __post_init__(self) -> None:
        if (self.lsn is None) == (not self.kafka_end):
            raise ValueError("a finish is a source LSN or Kafka's end, exactly one of them")

    def describe(self) -> str:
        if self.lsn is not None:
            return f"every change committed in Postgres up to LSN {lsn_text(self.lsn)}"
        return "everything in Kafka now"


@dataclass(frozen=True)
class Behind:
    """A partition not yet applied up to its offset at the finish line."""

    topic: str
    partition: int
    applied_to: int | None  # the next offset to apply; None: nobody has applied it yet
    end: int


def partitions_behind(
    ends: Mapping[TopicPartitionKey, int], applied_to: Mapping[TopicPartitionKey, int | None]
) -> list[Behind]:
    """The partitions of the finish line (`ends`: end offsets taken once) whose applied position
    (the next offset to apply, everything before it applied) has not reached their end."""
    behind = []
    for (topic, partition), end in sorted(ends.items()):
        at = applied_to.get((topic, partition))
        if at is None or at < end:
            behind.append(Behind(topic, partition, at, end))
    return behind


class Progress(Protocol):
    """What the finish line reads."""

    def end_offsets(self) -> dict[TopicPartitionKey, int]:
        """The end offset now of every non-empty partition of every subscribed topic."""

    def applied_to(
        self, partitions: list[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int | None]:
        """Per partition, the next offset to apply (everything before it is applied)."""

    def fence_offset(self, lsn: int) -> int | None:
        """The transaction-topic offset of the first recorded END at or after `lsn`."""

    def unfinished(self, fence_offset: int) -> Unfinished | None:
        """Transactions ended at or before the fence still missing events on projected tables."""


class FinishLine:
    """Fixed once, when the run is asked to finish (this object is made then); `reached` says
    whether everything before it is applied, and `waiting_for` what it waits for if not."""

    def __init__(self, finish: Finish, progress: Progress) -> None:
        self.finish = finish
        self.progress = progress
        self.fence: int | None = None  # the fence END's transaction-topic offset (LSN line)
        # The Kafka part of the line: read once, now for Kafka's end, at the fence for an LSN.
        self.ends = progress.end_offsets() if finish.kafka_end else None
        self.waiting_for = "the first check"

    def reached(self) -> bool:
        if self.ends is None:
            assert self.finish.lsn is not None
            # 3. the fence: the first END at or after the target LSN
            self.fence = self.progress.fence_offset(self.finish.lsn)
            if self.fence is None:
                self.waiting_for = (
                    f"Debezium to report a transaction at or after LSN {lsn_text(self.finish.lsn)} "
                    "on the transaction topic (is the connector running? projector connectors "
                    "status)"
                )
                return False
            # 5. and Kafka's end as it is once the fence is there, read this one time
            self.ends = self.progress.end_offsets()
        behind = partitions_behind(self.ends, self.progress.applied_to(list(self.ends)))
        if behind:
            first = behind[0]
            self.waiting_for = (
                f"{len(behind)} partition(s) to be applied to the finish line, e.g. "
                f"{first.topic}[{first.partition}] at {first.applied_to} of {first.end}"
            )
            return False
        if self.fence is not None:
            # 4. every transaction up to the fence settled on every projected table
            gap = self.progress.unfinished(self.fence)
            if gap is not None:
                self.waiting_for = (
                    f"{gap.transactions} transaction(s) ended before the fence to be complete, "
                    f"e.g. transaction {gap.tx_id} on {gap.data_collection}: {gap.settled} of "
                    f"{gap.expected} events applied or dead-lettered"
                )
                return False
        self.waiting_for = ""
        return True


def source_position(dsn: str | None) -> int:
    """The source database's WAL insert position now (step 1 of the argument above)."""
    if not dsn:
        raise ConfigError(
            "--until-caught-up reads where Postgres stands, and no source database is configured: "
            "set PROJECTOR_SOURCE_DSN (or `source_dsn` in the config file), or the connector's "
            "PG_HOST/PG_PORT/PG_DATABASE/CDC_USER/CDC_PASSWORD or ADMIN_DSN (the local stack "
            "writes them to .stack/client.env); or give the position: --until-lsn LSN"
        )
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProjectorError(
            f"cannot read the source's WAL position ({_where(dsn)}): {reason}"
        ) from exc
    assert row is not None
    return parse_lsn(str(row[0]))


def _where(dsn: str) -> str:
    """Host, database and user of a DSN, never its password."""
    from psycopg import conninfo

    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "an unreadable source DSN"
    return f"host {parts.get('host')}, database {parts.get('dbname')}, user {parts.get('user')}"
