"""Apply one batch (an offset range of one topic-partition) to its replica table.

A batch goes through the fast path (projector/replicas/fast_path.py: ClickHouse decodes the raw bytes)
when it can, else through the per-message path described here, which is also the reference the
fast path must equal (tests/integration/test_fast_path.py).

Messages are decoded in Python (fastavro, writer schemas from the registry) and turned into rows:

- c / r / u  → the `after` image, `_is_deleted = 0`
- d          → the key columns, `_is_deleted = 1` (the row disappears under `FINAL`)
- tombstone  → skipped (the delete before it already did the work)
- t          → every live key gets a deletion marker at the truncate's version; the batch is cut
               into chunks at truncates, inserted in order, so the markers see the rows before
- r, last    → when it ends a Debezium re-snapshot, after the batch's rows (either path): every
               key the snapshot did not read gets a deletion marker (projector/replicas/snapshot_sweep.py)
- d, on a table whose policy keeps deleted rows (soft, history: projector/replicas/delete_policy.py)
  → the marker carries the key's previous values, found as a TOAST placeholder's are (below)
- a column holding Debezium's unchanged-TOAST placeholder takes the key's previous value: its
  row earlier in the batch, else its newest stored version below the messages being written
  (read back in the form an insert takes: bytea as hex), matched to the key by ClickHouse itself
  (`numeric` 12.50 and 12.5 are one key); a placeholder never reaches the table.

A message that cannot be decoded or converted is a `PoisonMessage`: it goes to the dead-letter
queue with its provenance and the rest of the batch is applied. Everything here is a pure
function of the messages and the table's versions below them, so a replay produces the same
inserts under the same tokens.

Data never stops the projector. Any other failure while applying is judged by
`projector.errors.not_the_message`: an infrastructure failure (ClickHouse or the registry
unavailable, a ClickHouse resource error) is raised and the runner retries the batch; anything
else may be a message's fault, so `_apply_isolating` splits the messages in halves and applies
each, down to the single message that still fails, which goes to the dead-letter queue with the
error as its reason (stage `apply`). The halves are cut the same way on every attempt and their
inserts carry tokens named after their offsets (`s<first>-<last>.<chunk>`), so a replay after a
crash inserts nothing twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from projector.clickhouse import ClickHouse, ident, literal_chunks, quote
from projector.commit.checkpoint import BatchRange
from projector.commit.dead_letters import DeadLetter
from projector.commit.transactions import EventPlace
from projector.errors import PoisonMessage, not_the_message
from projector.kafka import source_table_of, table_of
from projector.messages import RawMessage, message_columns
from projector.replicas.catalog import (
    ReplicaCatalog,
    ReplicaTable,
    SourceColumn,
    key_columns,
    metadata,
    upcast,
    value_columns,
)
from projector.replicas.delete_policy import keeps_deleted_rows
from projector.replicas.events import BatchOutcome, Event, decode, transaction_fields
from projector.replicas.fast_path import (
    FastPath,
    FastPathRejected,
    FastPathUnsupported,
    Segment,
    plan_segments,
)
from projector.replicas.rows import insert_deletion_markers, insert_rows, is_toast_placeholder
from projector.replicas.snapshot_sweep import SnapshotSweep
from schemas.errors import SchemaError, UnknownSchema
from schemas.registry import SchemaCache, WriterSchema
from schemas.type_map import ColumnType, UnconvertibleValue
from schemas.upcasters import Upcasters

log = logging.getLogger("projector")


class BatchApplier:
    def __init__(
        self,
        ch: ClickHouse,
        schemas: SchemaCache,
        catalog: ReplicaCatalog,
        projection: str = "replica",
        upcasters: Upcasters | None = None,
        fast_path: FastPath | None = None,
        sweep: SnapshotSweep | None = None,
    ) -> None:
        """`sweep`: removes ghost rows after a Debezium re-snapshot (None: never)."""
        self.ch = ch
        self.fast_path = fast_path
        self.sweep = sweep
        self.schemas = schemas
        self.catalog = catalog
        self.projection = projection
        self.upcasters = upcasters or Upcasters()
        self._columns_by_schema: dict[int, dict[str, SourceColumn]] = {}

    def plan(self, messages: Sequence[RawMessage]) -> list[Segment] | None:
        """The fast path's schema segments of a batch, None when it takes the per-message path.
        Reads only the messages, so the runner computes it ahead, beside the batch in flight."""
        if self.fast_path is None:
            return None
        return plan_segments(*message_columns(messages))

    def apply(
        self,
        batch: BatchRange,
        messages: Sequence[RawMessage],
        dead_letter: Callable[[BatchRange, list[DeadLetter]], None],
        segments: list[Segment] | None = None,
        planned: bool = False,
    ) -> BatchOutcome:
        """Apply the batch; `planned`: `segments` is its `plan`, made by the caller already.
        Dead letters go to `dead_letter` once, after every row of the batch is inserted. Then, if
        the batch ends a Debezium re-snapshot of the table, the keys it did not read are marked
        deleted (projector/replicas/snapshot_sweep.py), whichever path wrote the rows."""
        outcome = self._apply_rows(batch, messages, dead_letter, segments, planned)
        if self.sweep is not None:
            replica = self.catalog.existing(*source_table_of(batch.topic))
            joined = [s.data for s in segments] if outcome.fast and segments else None
            outcome.stop = self.sweep.after_batch(batch, messages, replica, self.schemas, joined)
        return outcome

    def _apply_rows(
        self,
        batch: BatchRange,
        messages: Sequence[RawMessage],
        dead_letter: Callable[[BatchRange, list[DeadLetter]], None],
        segments: list[Segment] | None,
        planned: bool,
    ) -> BatchOutcome:
        # ClickHouse's decoding cannot fill a delete with the row's last values (a soft or
        # history table: projector/replicas/delete_policy.py): the per-message path does
        if self.fast_path is not None and not keeps_deleted_rows(
            self.catalog.policy_of(*source_table_of(batch.topic))
        ):
            if not planned:
                segments = self.plan(messages)
            if segments is not None:
                try:
                    return self._apply_fast(batch, segments)
                except FastPathUnsupported as exc:
                    log.debug("%s: per-message path (%s)", batch, exc)
                except FastPathRejected as exc:
                    log.info(
                        "%s: ClickHouse rejected the fast insert, finding the poison "
                        "messages with the per-message path: %s",
                        batch,
                        exc,
                    )
                except Exception as exc:
                    _raise_unless_the_messages(exc)
                    log.warning(
                        "%s: the fast path failed (%s: %s), the per-message path applies the batch",
                        batch,
                        type(exc).__name__,
                        exc,
                    )
        outcome = self._apply_isolating(batch, messages, "")
        if outcome.dead:
            dead_letter(batch, outcome.dead)
        return outcome

    def _apply_isolating(
        self, batch: BatchRange, messages: Sequence[RawMessage], chunk: str
    ) -> BatchOutcome:
        """The per-message path over `messages`; if it fails and the failure may be a message's
        (module docstring), each half of `messages` again, down to single messages: one that
        still fails is dead-lettered with the error. `chunk` prefixes the tokens' chunk names."""
        try:
            return self._apply_per_message(batch, messages, chunk)
        except Exception as exc:
            _raise_unless_the_messages(exc)
            if len(messages) == 1:
                message = messages[0]
                log.error(
                    "%s: offset %d could not be applied; dead-lettered",
                    batch,
                    message.offset,
                    exc_info=exc,
                )
                reason = f"{type(exc).__name__}: {exc}"[:2000]
                outcome = BatchOutcome(0, [DeadLetter.of(message, PoisonMessage("apply", reason))])
                place = self._place_of(message)
                if place:  # settled for its transaction, like every dead letter that decodes
                    outcome.count_dead_letter(place, table_of(batch.topic))
                return outcome
            if not chunk:
                log.warning(
                    "%s: applying failed (%s: %s); isolating the message(s) at fault",
                    batch,
                    type(exc).__name__,
                    exc,
                )
        middle = len(messages) // 2
        outcome = BatchOutcome(0, [])
        for part in (messages[:middle], messages[middle:]):
            name = f"s{part[0].offset}-{part[-1].offset}."
            outcome.merge(self._apply_isolating(batch, part, name))
        return outcome

    def _place_of(self, message: RawMessage) -> EventPlace | None:
        """A message's place in its transaction, None when it names none or does not decode."""
        try:
            event = decode(message, self.schemas)
        except Exception as exc:  # whatever made it fail may be this, too
            _raise_unless_the_messages(exc)
            return None
        return None if event is None else EventPlace.of(event.value)

    def _apply_per_message(
        self, batch: BatchRange, messages: Sequence[RawMessage], chunk: str = ""
    ) -> BatchOutcome:
        dead: list[DeadLetter] = []
        events: list[Event] = []
        for message in messages:
            try:
                event = decode(message, self.schemas)
            except PoisonMessage as exc:
                dead.append(DeadLetter.of(message, exc))
                continue
            if event is not None:
                events.append(event)

        schema_name, table_name = source_table_of(batch.topic)
        replica: ReplicaTable | None = self.catalog.existing(schema_name, table_name)
        # The replica table is ensured once per (value schema, key schema) seen in the batch.
        ensured: dict[tuple[int, int | None], ReplicaTable | PoisonMessage] = {}
        good: list[Event] = []
        for event in events:
            if event.value["op"] == "t":
                good.append(event)  # carries no row: needs no columns, and has no key schema
                continue
            key_id = event.key_schema.schema_id if event.key_schema else None
            target = ensured.get((event.schema.schema_id, key_id))
            if target is None:
                try:
                    target = self._ensure(batch.topic, event.schema, event.key_schema)
                except PoisonMessage as exc:
                    target = exc
                ensured[(event.schema.schema_id, key_id)] = target
            if isinstance(target, PoisonMessage):
                dead.append(DeadLetter.of(event.message, target))
                continue
            replica = target
            good.append(event)

        outcome = BatchOutcome(0, dead)
        collection = f"{schema_name}.{table_name}"
        written: list[Event] = []
        if replica is not None:
            written, more_dead = self._write(batch, replica, good, chunk)
            dead += more_dead
            outcome.applied = len(written)
        else:
            # Only truncates (or nothing) can be left without a table: truncating a table that
            # has no replica yet changes nothing, so they count as applied for their transaction.
            written = [e for e in good if e.value["op"] == "t"]
        for event in written:
            place = EventPlace.of(event.value)
            if place:
                outcome.count_transaction(place, collection)
        # Every other decoded event was dead-lettered; its transaction knows it is settled.
        applied = {id(e) for e in written}
        for event in events:
            place = EventPlace.of(event.value)
            if place and id(event) not in applied:
                outcome.count_dead_letter(place, collection)
        return outcome

    def _ensure(
        self, topic: str, schema: WriterSchema, key_schema: WriterSchema | None
    ) -> ReplicaTable:
        """The replica table, created or altered to hold events of this writer schema."""
        schema_name, table_name = source_table_of(topic)
        return self.catalog.ensure(
            schema_name,
            table_name,
            key_columns(key_schema.raw if key_schema else None),
            list(self._columns_by_source_name(topic, schema).values()),
            self.upcasters.for_table(schema_name, table_name),
            previous=partial(self._previous_version_columns, topic, schema),
        )

    def _columns_by_source_name(self, topic: str, schema: WriterSchema) -> dict[str, SourceColumn]:
        """The replica columns of a writer schema, under the table's declared upcaster, by the
        name the field has in that schema (a renamed field maps to its new column)."""
        columns = self._columns_by_schema.get(schema.schema_id)
        if columns is None:
            upcaster = self.upcasters.for_table(*source_table_of(topic))
            columns = {c.name: upcast(c, upcaster) for c in value_columns(schema.raw)}
            self._columns_by_schema[schema.schema_id] = columns
        return columns

    def _previous_version_columns(
        self, topic: str, schema: WriterSchema
    ) -> list[SourceColumn] | None:
        """The replica columns of the table's schema version before this one (None: the first),
        under the table's declared upcaster."""
        previous = self.schemas.previous_version(f"{topic}-value", schema)
        if previous is None:
            return None
        upcaster = self.upcasters.for_table(*source_table_of(topic))
        return [upcast(c, upcaster) for c in value_columns(previous.raw)]

    # ---- the fast path -------------------------------------------------------------------------

    def _apply_fast(self, batch: BatchRange, segments: list[Segment]) -> BatchOutcome:
        """Every segment inserted by ClickHouse decoding the bytes itself (projector/replicas/fast_path.py);
        FastPathUnsupported / FastPathRejected when the batch needs the per-message path."""
        assert self.fast_path is not None
        schema_name, table_name = source_table_of(batch.topic)
        upcaster = self.upcasters.for_table(schema_name, table_name)
        outcome = BatchOutcome(0, [], fast=True)
        for number, segment in enumerate(segments):
            try:
                schema = self.schemas.get(segment.value_schema_id)
                key_schema = self.schemas.get(segment.key_schema_id)
                replica = self._ensure(batch.topic, schema, key_schema)
            except (UnknownSchema, SchemaError, PoisonMessage) as exc:
                raise FastPathUnsupported(str(exc)) from exc
            token = batch.token(self.projection, replica.qualified, f"fast{number}")
            per_transaction = self.fast_path.insert(
                replica,
                self._columns_by_source_name(batch.topic, schema),
                upcaster,
                segment,
                batch.partition,
                token,
                transaction_fields=transaction_fields(schema.raw),
            )
            outcome.applied += len(segment.offsets)
            for xid, span in per_transaction.items():
                key = (xid, f"{schema_name}.{table_name}")
                outcome.count_span(outcome.transactions, key, span)
        return outcome

    # ---- rows --------------------------------------------------------------------------------

    def _write(
        self, batch: BatchRange, replica: ReplicaTable, events: list[Event], chunk_prefix: str = ""
    ) -> tuple[list[Event], list[DeadLetter]]:
        """Insert the batch's rows in chunks and return the events written. A truncate ends a
        chunk, and its deletion markers are computed only after the rows before it are stored,
        so they cover those rows too."""
        dead: list[DeadLetter] = []
        chunk: list[dict[str, Any]] = []
        chunk_number = 0
        columns = self._batch_columns(batch.topic, replica, events)
        # Keys as the rows carry them: by the column an insert writes (bytea: its hex input).
        key_inputs = [columns[k].input_name for k in replica.key_columns]
        latest: dict[tuple[str, ...], dict[str, Any]] = {}  # key → newest full row in this batch
        below = events[0].message.offset if events else 0
        stored = self._stored_rows(replica, events, columns, key_inputs, below)
        written: list[Event] = []

        def insert(rows: list[dict[str, Any]]) -> None:
            nonlocal chunk_number
            token = batch.token(self.projection, replica.qualified, f"{chunk_prefix}{chunk_number}")
            insert_rows(self.ch, replica, rows, token)
            chunk_number += 1

        for event in events:
            op = event.value["op"]
            if op == "t":
                insert(chunk)
                chunk = []
                self._truncate(replica, event)
                chunk_number += 1  # the chunk numbers (tokens) after it stay those of a replay
                latest.clear()
                stored.clear()
                written.append(event)
                continue
            try:
                row = self._row(replica, event)
            except PoisonMessage as exc:
                dead.append(DeadLetter.of(event.message, exc))
                continue
            key = _key(row, key_inputs)
            if replica.key_columns and op != "d":
                placeholders = [c for c, v in row.items() if is_toast_placeholder(v)]
                if placeholders:
                    previous = latest.get(key) or stored.get(key) or {}
                    for column in placeholders:
                        # Unchanged TOAST value: keep what the key had before this event.
                        row[column] = previous.get(column)
                latest[key] = row
            elif op == "d":
                if replica.keeps_deleted_rows:  # the marker keeps the row's last values
                    previous = latest.get(key) or stored.get(key) or {}
                    row = {**previous, **row}
                latest.pop(key, None)
                stored.pop(key, None)
            chunk.append(row)
            written.append(event)
        insert(chunk)
        return written, dead

    def _batch_columns(
        self, topic: str, replica: ReplicaTable, events: list[Event]
    ) -> dict[str, SourceColumn]:
        """The source columns of the events' writer schemas by replica column name (a later
        schema's wins), and every key column (one missing from them read as its stored type)."""
        columns: dict[str, SourceColumn] = {}
        for schema in {e.schema.schema_id: e.schema for e in events}.values():
            try:
                found = self._columns_by_source_name(topic, schema)
            except PoisonMessage:
                continue  # the events of that schema are dead-lettered by `_ensure`
            columns.update((c.name, c) for c in found.values())
        for key in replica.key_columns:
            if key not in columns:
                columns[key] = SourceColumn(key, ColumnType(replica.columns[key], lambda v: v))
        return columns

    def _row(self, replica: ReplicaTable, event: Event) -> dict[str, Any]:
        value, message = event.value, event.message
        op = value["op"]
        source = value.get("source") or {}
        deleted = op == "d"
        image = value["before"] if deleted else value["after"]
        if image is None or (deleted and any(image.get(k) is None for k in replica.key_columns)):
            image = {**(image or {}), **self._key_image(event)}
        if deleted and replica.key_columns:
            image = {k: image.get(k) for k in replica.key_columns}
        columns = self._columns_by_source_name(event.message.topic, event.schema)
        row: dict[str, Any] = {}
        for name, raw in image.items():
            column = columns.get(name)
            if column is None:
                continue
            if raw is None or is_toast_placeholder(raw):
                row[column.input_name] = raw
                continue
            try:
                row[column.input_name] = column.ctype.to_clickhouse(raw)
            except (UnconvertibleValue, ValueError, TypeError, OverflowError) as exc:
                raise PoisonMessage("convert", f"column {name}: {exc}") from exc
        row.update(metadata(op, source, message.partition, message.offset))
        return row

    def _key_image(self, event: Event) -> dict[str, Any]:
        """The message key's datum (a delete without a before-image, e.g. REPLICA IDENTITY
        NOTHING)."""
        if event.message.key is None:
            return {}
        try:
            datum = self.schemas.decode(event.message.key)[1]
        except (SchemaError, EOFError, ValueError, TypeError, IndexError) as exc:
            raise PoisonMessage("decode", f"undecodable key: {type(exc).__name__}: {exc}") from exc
        return datum if isinstance(datum, dict) else {}

    def _stored_rows(
        self,
        replica: ReplicaTable,
        events: list[Event],
        columns: dict[str, SourceColumn],
        key_inputs: list[str],
        below: int,
    ) -> dict[tuple[str, ...], dict[str, Any]]:
        """The stored values the events need, per key: of the columns an update carries a TOAST
        placeholder in, and (a table that keeps deleted rows) of every column of a deleted key.
        The key's newest version below offset `below` (the first message being written, so a
        replay, which may find this batch's own rows stored already, reads the same; when
        merges left no version below, its newest), unless that is a deletion."""
        if not replica.key_columns:
            return {}
        wanted: dict[tuple[str, ...], list[Any]] = {}  # key → its values, as inserts carry them
        needed: set[str] = set()  # input names of the columns to read back
        for event in events:
            op, after = event.value["op"], event.value.get("after")
            if op == "d" and replica.keeps_deleted_rows:
                keys_only = True
            elif op == "u" and after and any(is_toast_placeholder(v) for v in after.values()):
                keys_only = False
            else:
                continue
            try:
                row = self._row(replica, event)
            except PoisonMessage:
                continue  # dead-lettered by `_write`
            if keys_only:
                needed.update(c.input_name for c in columns.values())
            else:
                needed.update(c for c, v in row.items() if is_toast_placeholder(v))
            wanted.setdefault(_key(row, key_inputs), [row.get(k) for k in key_inputs])
        needed.difference_update(key_inputs)
        by_input = {c.input_name: c for c in columns.values()}
        reads = [by_input[name].stored_value("s") for name in sorted(needed) if name in by_input]
        if not wanted or not reads:
            return {}
        # ClickHouse matches the stored keys to the wanted ones: their values go in as the
        # inserts send them (JSONEachRow, the column types), so 12.50 is 12.5 and hex is bytes.
        keys = [columns[k] for k in replica.key_columns]
        structure = ", ".join(
            ["__wanted UInt32", *(f"{ident(c.input_name)} {c.ctype.clickhouse}" for c in keys)]
        )
        lines = [
            json.dumps(
                {"__wanted": n, **dict(zip(key_inputs, values, strict=True))},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for n, values in enumerate(wanted.values())
        ]
        matched = ", ".join(
            f"{(c.ctype.clickhouse_input_expr or '{}').format(ident(c.input_name))} AS __k{n}"
            for n, c in enumerate(keys)
        )
        on = " AND ".join(f"s.{ident(c.name)} = w.__k{n}" for n, c in enumerate(keys))
        rows = []
        for group in literal_chunks(lines, quote):  # the keys travel in the statement: bounded
            rows += self.ch.rows(
                f"SELECT w.__wanted AS __wanted, s._is_deleted AS __deleted, {', '.join(reads)} "
                f"FROM {replica.qualified} AS s INNER JOIN (SELECT __wanted, {matched} "
                f"FROM format(JSONEachRow, {quote(structure)}, {quote(chr(10).join(group))})) "
                f"AS w ON {on} "
                f"ORDER BY s._version < {int(below)} DESC, s._version DESC LIMIT 1 BY __wanted "
                # read back as inserts take them: NaN as "nan", Decimals with their scale
                "SETTINGS output_format_json_quote_denormals = 1, "
                "output_format_decimal_trailing_zeros = 1"
            )
        keys_in_order = list(wanted)
        stored: dict[tuple[str, ...], dict[str, Any]] = {}
        for row in rows:
            key = keys_in_order[int(row.pop("__wanted"))]
            if not int(row.pop("__deleted")):
                stored[key] = row
        return stored

    def _truncate(self, replica: ReplicaTable, event: Event) -> None:
        """Empty the replica as of the truncate, inside ClickHouse (no key travels through Python:
        a truncate of a big table must not cost the projector memory).

        A keyed table gets a deletion marker, versioned at the truncate's offset, for every key
        that has a row older than the truncate (`insert_deletion_markers`): rows written later
        (higher offsets) win over the markers. An append-only table deletes the rows before the
        truncate. (Offsets are comparable only inside one partition: exact with one partition
        per topic.)"""
        message = event.message
        if not replica.key_columns:
            self.ch.execute(
                f"DELETE FROM {replica.qualified} WHERE _partition = {message.partition} "
                f"AND _offset < {message.offset}"
            )
            return
        marker = metadata("t", event.value.get("source") or {}, message.partition, message.offset)
        insert_deletion_markers(self.ch, replica, marker, below=message.offset, live_only=False)


def _key(row: dict[str, Any], key_inputs: list[str]) -> tuple[str, ...]:
    """A key comparable between rows converted in this batch (one conversion per type, so equal
    values have equal text); rows read from ClickHouse are matched by ClickHouse itself."""
    return tuple(str(row.get(k)) for k in key_inputs)


def _raise_unless_the_messages(exc: Exception) -> None:
    """Raise `exc`, or the infrastructure error it stands for, unless it may be a message's
    fault (`projector.errors.not_the_message`)."""
    failure = not_the_message(exc)
    if failure is exc:
        raise exc
    if failure is not None:
        raise failure from exc
