"""Errors of the projector, each naming what to do about it, and which failures are a message's
fault (`not_the_message`)."""

import re

from schemas.errors import RegistryUnavailable


class ProjectorError(RuntimeError):
    """Base class."""


class ConfigError(ProjectorError):
    """The projector's configuration is invalid or incomplete."""


class NotAnLsn(ConfigError, ValueError):
    """Text that is not a Postgres LSN (a command-line option, or an API's `min_lsn`)."""


class ClickHouseUnavailable(ProjectorError):
    """ClickHouse cannot be reached right now (transient: retried with back-off)."""


class SourceUnavailable(ProjectorError):
    """Postgres cannot be reached to request a re-read of a table (transient: retried)."""


class KafkaUnavailable(ProjectorError):
    """Kafka cannot answer a question about a topic right now (transient: retried)."""


class StatementRejected(ProjectorError):
    """ClickHouse refused a statement over message bytes (a value out of range, an unknown
    schema, malformed Avro): not retried; the fast path hands the batch to the per-message path."""


class RebuildRefused(ProjectorError):
    """A rebuild, swap, rollback or drop that cannot be done as asked (the message says why and
    what to do instead); nothing was changed."""


class ResetRefused(ProjectorError):
    """`projector reset` cannot move a table as asked (the message says why and what to do
    instead); nothing was changed."""


class CheckpointError(ProjectorError):
    """The checkpoint table contradicts what the consumer sees (an invariant is broken)."""


class IntentGone(CheckpointError):
    """An open intent (a batch a crash left half applied, to be replayed exactly before anything
    else: projector/commit/checkpoint.py, step C) whose first messages Kafka no longer holds:
    retention (or compaction) removed them while the projector was away. Nothing can replay it,
    and waiting would stall every partition of the member silently; the run stops with the
    remedy instead."""

    def __init__(self, topic: str, partition: int, first: int, last: int, found: int) -> None:
        table = ".".join(topic.split(".")[-2:])
        super().__init__(
            f"{topic}[{partition}]: the open intent {first}-{last} (a batch a crash left half "
            f"applied) cannot be replayed: Kafka no longer holds offset {first} (the partition "
            f"now starts at {found}: retention or compaction removed the messages), so its "
            "rows may be half applied and nothing after it can be applied. Remedy: skip to "
            f"what Kafka holds, `projector reset {table} --to-offset {found} --partition "
            f"{partition}` (with chDB, stop the projector first); then re-read the table from "
            f"Postgres, `projector rebuild {table} --from snapshot`, and check the read models "
            "with `projector read-models reconcile` (`projector rebuild FAMILY` if one "
            "drifted)."
        )


class PartitionLost(ProjectorError):
    """Another member claimed the partition after this one did (the commit protocol's fence,
    projector/commit/checkpoint.py): this member's view of its assignment is stale — ClickHouse stalled
    past `max.poll.interval.ms`, say, and the group moved the partition meanwhile. The batch is
    dropped unwritten; the partition's new owner applies it (a member Kafka still gives the
    partition to claims it anew and resumes from its checkpoint)."""

    def __init__(self, topic: str, partition: int, ours: object, newest: object) -> None:
        super().__init__(
            f"{topic}[{partition}] is no longer ours: our claim {ours}, the newest {newest}"
        )
        self.topic = topic
        self.partition = partition


class PoisonMessage(ProjectorError):
    """One message cannot be applied (undecodable, unknown schema, unconvertible value).

    It goes to the dead-letter queue with this message as its reason; the batch goes on.
    """

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")


# ClickHouse errors that say nothing about the data (by error code, as both chDB's and a server's
# messages carry it: "Code: 243. DB::Exception: ..."): the engine cannot do the work right now.
# Retried like an unreachable server, never blamed on a message.
INFRASTRUCTURE_ERROR_CODES: dict[int, str] = {
    24: "CANNOT_WRITE_TO_OSTREAM",
    74: "CANNOT_READ_FROM_FILE_DESCRIPTOR",
    75: "CANNOT_WRITE_TO_FILE_DESCRIPTOR",
    76: "CANNOT_OPEN_FILE",
    159: "TIMEOUT_EXCEEDED",
    164: "READONLY",
    173: "CANNOT_ALLOCATE_MEMORY",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    243: "NOT_ENOUGH_SPACE",
    252: "TOO_MANY_PARTS",
    279: "ALL_CONNECTION_TRIES_FAILED",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    999: "KEEPER_EXCEPTION",
}
CLICKHOUSE_ERROR_CODE = re.compile(r"Code: (\d+)\. DB::Exception")


def raise_unless_refused(exc: Exception) -> None:
    """Re-raise what `not_the_message` says is not the statement's fault (unavailability, a
    broken invariant: the caller's caller retries or stops); return when ClickHouse refused the
    statement itself (a definition it cannot run: the caller fails what ran it, nothing else)."""
    infrastructure = not_the_message(exc)
    if infrastructure is exc:
        raise exc
    if infrastructure is not None:
        raise infrastructure from exc


def not_the_message(exc: Exception) -> Exception | None:
    """The exception to raise instead of blaming the message being applied, or None when `exc`
    may well be the message's (then it goes to the dead-letter queue with `exc` as its reason).

    Not the message's: the registry, ClickHouse, Kafka or Postgres (a re-read request) unreachable (transient: the runner retries
    the batch), a ClickHouse error of `INFRASTRUCTURE_ERROR_CODES` or an operating-system error
    (made a `ClickHouseUnavailable`, retried the same way), a broken invariant of the commit
    protocol (`CheckpointError`) or memory exhaustion (both stop the projector), and a partition
    lost to another member (`PartitionLost`: the batch is dropped)."""
    if isinstance(
        exc,
        ClickHouseUnavailable
        | RegistryUnavailable
        | SourceUnavailable
        | KafkaUnavailable
        | CheckpointError
        | PartitionLost
        | MemoryError,
    ):
        return exc
    if isinstance(exc, OSError):
        return ClickHouseUnavailable(f"{type(exc).__name__}: {exc}")
    code = CLICKHOUSE_ERROR_CODE.search(str(exc))
    if code is not None and int(code.group(1)) in INFRASTRUCTURE_ERROR_CODES:
        first_line = str(exc).strip().splitlines()[0][:500]
        return ClickHouseUnavailable(f"ClickHouse cannot work right now: {first_line}")
    return None


class VerifyError(ProjectorError):
    """`projector verify` cannot compare (a side unreachable, the projector not catching up):
    nothing was found to differ, nothing was found equal either."""
