"""Errors of the projector, each naming what to do about it."""


class ProjectorError(RuntimeError):
    """Base class."""


class ConfigError(ProjectorError):
    """The projector's configuration is invalid or incomplete."""


class ClickHouseUnavailable(ProjectorError):
    """ClickHouse cannot be reached right now (transient: retried with back-off)."""


class StatementRejected(ProjectorError):
    """ClickHouse refused a statement over message bytes (a value out of range, an unknown
    schema, malformed Avro): not retried; the fast path hands the batch to the per-message path."""


class CheckpointError(ProjectorError):
    """The checkpoint table contradicts what the consumer sees (an invariant is broken)."""


class PoisonMessage(ProjectorError):
    """One message cannot be applied (undecodable, unknown schema, unconvertible value).

    It goes to the dead-letter queue with this message as its reason; the batch goes on.
    """

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")
