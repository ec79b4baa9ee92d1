"""`projector dlq replay`: apply waiting dead letters again, one message per batch.

A dead letter keeps its original offset, so its `_version` is what it would have been: if its key
changed later, the later event still wins. A letter that applies now is marked replayed; one that
fails again stays, with the new reason logged.

A replayed letter also counts for its transaction in the ledger (projector/commit/ledger.py): the
dead letter held every watermark over its table, and applied now, it releases them. A dead letter
of the transaction topic (an END the projector could not decode) is recorded as the END it is,
which releases the watermarks its unreadable row held.

The read models are not written here: a replayed letter's offset is asked of the read models'
stage (projector/read_models/stage.py, `request_recompute`), which whoever holds its lease
recomputes — a `projector run` beside this command, or the next one.
"""

from __future__ import annotations

from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import PROJECTION, BatchRange
from projector.commit.dead_letters import DeadLetterStore
from projector.commit.ledger import TransactionLedger
from projector.config import ProjectorConfig
from projector.messages import RawMessage
from projector.read_models.stage import request_recompute
from projector.replicas.apply import BatchApplier
from projector.replicas.catalog import ReplicaCatalog
from projector.replicas.signal_table import SignalTable
from schemas.errors import SchemaError, UnknownSchema
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters

REPLAY = "dlq-replay"  # the applier named in the deduplication tokens of replayed letters


def replay_dead_letters(
    config: ProjectorConfig, ch: ClickHouse, topic: str | None = None
) -> tuple[int, int]:
    """(replayed, still dead) over the waiting letters, of one topic or all."""
    store = DeadLetterStore(ch, config.control_database)
    store.create()
    ledger = TransactionLedger(ch, config.control_database, PROJECTION)
    ledger.create()
    schemas = SchemaCache(config.registry_url)
    applier = BatchApplier(
        ch,
        schemas,
        ReplicaCatalog(
            ch,
            config.replica_prefix,
            SignalTable(config.source_dsn, config.publication).request,
            delete_policies=config.delete_policy,
            history_prefix=config.history_prefix,
        ),
        projection=REPLAY,
        upcasters=Upcasters.load(config.upcasters_file),
    )
    replayed = still_dead = 0
    for summary in store.list(limit=1_000_000):
        if topic is not None and summary["topic"] != topic:
            continue
        letter = store.get(summary["topic"], int(summary["partition"]), int(summary["offset"]))
        if letter is None:
            continue
        message = RawMessage(
            letter["topic"],
            int(letter["partition"]),
            int(letter["offset"]),
            store.decode_bytes(letter["key_b64"]),
            store.decode_bytes(letter["value_b64"]),
        )
        batch = BatchRange(message.topic, message.partition, message.offset, message.offset)
        if message.topic == config.transaction_topic:
            if not _record_transaction_event(ledger, schemas, batch, message):
                still_dead += 1
                continue
        else:
            outcome = applier.apply(batch, [message], lambda _batch, _dead: None)
            if outcome.dead:
                still_dead += 1
                continue
            # The read models' stage may have passed this offset: it recomputes it again.
            request_recompute(ch, config.control_database, batch)
            # Under the replay's own token: the original batch's progress insert was another.
            ledger.record_progress(batch, outcome.transactions, projection=REPLAY)
        store.mark_replayed(letter)
        replayed += 1
    return replayed, still_dead


def _record_transaction_event(
    ledger: TransactionLedger, schemas: SchemaCache, batch: BatchRange, message: RawMessage
) -> bool:
    """Record a transaction-topic letter that reads now; False while it still does not."""
    if message.value is None:
        return False
    try:
        _, value = schemas.decode(message.value)
    except (SchemaError, UnknownSchema, ValueError, EOFError, TypeError, IndexError):
        return False
    ledger.record_ends(batch, [(message.offset, value)], projection=REPLAY)
    ledger.forget_unreadable(message.offset)
    return True
