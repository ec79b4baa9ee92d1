"""`projector dlq replay`: apply waiting dead letters again, one message per batch.

A dead letter keeps its original offset, so its `_version` is what it would have been: if its key
changed later, the later event still wins. A letter that applies now is marked replayed; one that
fails again stays, with the new reason logged.
"""

from __future__ import annotations

from projector.apply import BatchApplier
from projector.checkpoint import BatchRange
from projector.clickhouse import ClickHouse
from projector.config import ProjectorConfig
from projector.dlq import DeadLetterStore
from projector.materialize import maintainer_for
from projector.messages import RawMessage, source_table_of
from projector.replica import ReplicaCatalog
from projector.resnapshot import SignalTable
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters


def replay_dead_letters(
    config: ProjectorConfig, ch: ClickHouse, topic: str | None = None
) -> tuple[int, int]:
    """(replayed, still dead) over the waiting letters, of one topic or all."""
    store = DeadLetterStore(ch, config.control_database)
    store.create()
    applier = BatchApplier(
        ch, SchemaCache(config.registry_url),
        ReplicaCatalog(ch, config.replica_prefix, SignalTable(config.source_dsn).request),
        projection="dlq-replay", upcasters=Upcasters.load(config.upcasters_file),
    )  # fmt: skip
    read_models = maintainer_for(config, ch)
    if read_models is not None:
        read_models.ensure()
    replayed = still_dead = 0
    for summary in store.list(limit=1_000_000):
        if topic is not None and summary["topic"] != topic:
            continue
        letter = store.get(summary["topic"], int(summary["partition"]), int(summary["offset"]))
        if letter is None:
            continue
        message = RawMessage(
            letter["topic"], int(letter["partition"]), int(letter["offset"]),
            store.decode_bytes(letter["key_b64"]), store.decode_bytes(letter["value_b64"]),
        )  # fmt: skip
        batch = BatchRange(message.topic, message.partition, message.offset, message.offset)
        outcome = applier.apply(batch, [message], lambda _batch, _dead: None)
        if read_models is not None and not outcome.dead:
            read_models.apply_batch(batch, *source_table_of(message.topic))
        if outcome.dead:
            still_dead += 1
        else:
            store.mark_replayed(letter)
            replayed += 1
    return replayed, still_dead
