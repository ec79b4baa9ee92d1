"""The fast path: ClickHouse decodes a batch's Avro messages itself, and inserts them in one go.

Decoding Debezium envelopes one by one in Python is the projector's largest cost (see
docs/benchmarks.md); ClickHouse's `AvroConfluent` input format reads the same Confluent-framed
bytes an order of magnitude faster, with the writer schemas from the same registry. So for a batch
the fast path can take, the projector only concatenates the raw message values and generates one
`INSERT INTO replica SELECT … FROM <those bytes>` per schema version in the batch, whose SELECT
does in SQL what `BatchApplier._row` does in Python:

- c / r / u → the `after` image; d → the key columns from `before`, every other column its table
  default (as an insert that omits it would give), `_is_deleted = 1`;
- each column converted by its type's `avro_sql` (schemas/type_map.py), then CAST to the column's
  type; `_version` / `_offset` from the message offsets (a second table, paired with the messages
  by position: one reading thread keeps their order), `_lsn`, `_tx_id`, `_commit_ts` from
  `source`.

The SQL is generated here alone; a backend only runs it over the bytes (`AvroQueryBackend`): the
embedded engine reads them from files, a ClickHouse server receives them with the statement as
external data — one request whose temporary tables hold the messages and their offsets. (A
server's `input()` would stream the messages as the request body, but then the offsets have no
way in but URL parameters, which a server caps at 128 KiB each — 50,000 offsets do not fit — and
the transaction count below is a SELECT, which `input()` cannot serve.)

Same exactly-once protocol: the inserts run inside the batch's intent, under deduplication tokens
of the batch's range (chunk names `fast<n>`, never equal to the per-message path's chunk numbers).

What the fast path leaves to the per-message path, decided before anything is inserted
(`plan_segments`, `FastPath.insert` raising `FastPathUnsupported`):
  a message without a key (a truncate, or a table without a primary key), a value containing
  Debezium's unchanged-TOAST placeholder, a value or key not Confluent-framed, a column type
  without an SQL form (arrays, time, variable-scale numeric) or with a declared retype.
And when ClickHouse rejects the insert (a value out of range, an unknown schema, a malformed
message: `FastPathRejected`), the batch goes through the per-message path, which decodes each
message in Python, dead-letters exactly the poison ones and applies the rest. Such a rejection
happens before any row of that insert is stored (one insert block per batch: the batch is far
below `max_insert_block_size`); rows of an *earlier* schema segment of the same batch may already
be stored and are then written again, identical, by the per-message path — the same key and
`_version`, so `FINAL` shows one of them.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from projector.clickhouse import AVRO_SOURCE, OFFSETS_SOURCE, ident, quote
from projector.commit.transactions import EventSpan
from projector.errors import StatementRejected
from projector.replicas.catalog import (
    INPUT_SUFFIX,
    META_SQL,
    TOAST_PLACEHOLDER_BYTES,
    ReplicaTable,
    SourceColumn,
)
from schemas.upcasters import Upcaster


class FastPathUnsupported(Exception):
    """This batch needs the per-message path (decided before inserting anything)."""


class FastPathRejected(Exception):
    """ClickHouse refused the fast insert: the per-message path finds the poison messages."""


class AvroQueryBackend(Protocol):
    """A ClickHouse backend that runs SQL over raw message bytes (`ChdbBackend`, `ServerBackend`):
    in `sql`, `AVRO_SOURCE` is the table of the concatenated messages `data` (one writer schema;
    `sample` is one of them) and `OFFSETS_SOURCE` the table of their `offsets`; a statement
    ClickHouse refuses raises `StatementRejected`."""

    def over_avro(
        self,
        sql: str,
        data: bytes,
        registry_url: str,
        *,
        sample: bytes,
        offsets: bytes = b"",
        fmt: str = "CSV",
    ) -> str: ...

    def rows(self, sql: str) -> list[dict[str, Any]]: ...


@dataclass
class Segment:
    """A run of consecutive messages of one batch with the same value and key schema ids."""

    value_schema_id: int
    key_schema_id: int
    offsets: list[int] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    data: bytes = b""  # the values, concatenated


def plan_segments(
    offsets: Sequence[int], keys: Sequence[bytes | None], values: Sequence[bytes | None]
) -> list[Segment] | None:
    """The batch (its messages' offsets, keys and values) cut into schema segments, tombstones
    dropped; None when some message needs the per-message path (see the module docstring).
    Runs once per message: kept lean."""
    segments: list[Segment] = []
    value_header = key_header = b""
    segment_offsets: list[int] = []
    segment_values: list[bytes] = []
    for offset, key, value in zip(offsets, keys, values, strict=True):
        if value is None:
            continue  # a tombstone: the delete before it did the work
        if key is None:
            return None
        # The magic byte and schema id in front of the value and the key; a message whose header
        # equals the segment's is framed like the segment's first message.
        if value[:5] != value_header or key[:5] != key_header:
            value_header, key_header = value[:5], key[:5]
            if len(value_header) < 5 or len(key_header) < 5 or value[0] or key[0]:
                return None  # not Confluent-framed
            segment_offsets, segment_values = [], []
            segments.append(
                Segment(
                    int.from_bytes(value_header[1:], "big"),
                    int.from_bytes(key_header[1:], "big"),
                    segment_offsets,
                    segment_values,
                )
            )
        segment_offsets.append(offset)
        segment_values.append(value)
    for segment in segments:
        segment.data = b"".join(segment.values)
        if TOAST_PLACEHOLDER_BYTES in segment.data:
            return None
    return segments


class FastPath:
    def __init__(
        self, ch: AvroQueryBackend, registry_url: str, count_transactions: bool = True
    ) -> None:
        self.ch = ch
        self.registry_url = registry_url
        self.count_transactions = count_transactions
        self._defaults: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}

    def insert(
        self,
        replica: ReplicaTable,
        columns: dict[str, SourceColumn],
        upcaster: Upcaster,
        segment: Segment,
        partition: int,
        token: str,
        transaction_fields: Sequence[str] | None,
    ) -> dict[str, EventSpan]:
        """Insert one segment; returns the applied events per Postgres transaction id, with
        their LSNs (empty unless transactions are counted)."""
        select, checks = self._select_list(replica, columns, upcaster)
        insert_columns = [c.name for c in columns.values()] + list(META_SQL)
        meta = [expr.format(partition=partition) for expr in META_SQL.values()]
        # The offsets travel beside the bytes, paired with the messages by position (an array
        # literal of 50,000 offsets would make the statement slow to parse).
        sql = (
            f"INSERT INTO {replica.qualified} ({', '.join(ident(c) for c in insert_columns)}) "
            f"SETTINGS insert_deduplication_token = {quote(token)} "
            f"SELECT {', '.join(select + meta)} "
            "FROM (SELECT op, before, after, source, rowNumberInAllBlocks() AS _position "
            f"FROM {AVRO_SOURCE}) AS e "
            "INNER JOIN (SELECT kafka_offset, rowNumberInAllBlocks() AS _position "
            f"FROM {OFFSETS_SOURCE}) AS o ON e._position = o._position "
            f"WHERE throwIf(NOT ({' AND '.join(checks)}), "
            "'a value needs the per-message path') = 0"
        )
        data = segment.data
        sample = min(segment.values, key=len)  # the columns' source for a server: small is quick
        offsets = array("Q", segment.offsets)
        if sys.byteorder != "little":
            offsets.byteswap()
        try:
            self.ch.over_avro(
                sql, data, self.registry_url, sample=sample, offsets=offsets.tobytes()
            )
        except StatementRejected as exc:
            raise FastPathRejected(str(exc).strip().splitlines()[0][:500]) from exc
        if not self.count_transactions or transaction_fields is None:
            return {}
        order = (
            "tupleElement(transaction, 'data_collection_order')"
            if "data_collection_order" in transaction_fields
            else "CAST(NULL AS Nullable(Int64))"
        )
        # Per transaction: its events' orders (who they are: projector/commit/ledger.py,
        # "Counted once"), the events that carry none, and their LSNs.
        counted = self.ch.over_avro(
            "SELECT xid, arrayStringConcat(groupArrayIf(toString(position), isNotNull(position)), ','), "
            "countIf(isNull(position)), min(lsn), max(lsn) FROM (SELECT "
            "splitByChar(':', tupleElement(transaction, 'id'))[1] AS xid, "
            "toUInt64OrZero(splitByChar(':', tupleElement(transaction, 'id'))[2]) AS lsn, "
            f"{order} AS position "
            f"FROM {AVRO_SOURCE} WHERE isNotNull(transaction)) GROUP BY xid",
            data,
            self.registry_url,
            sample=sample,
            fmt="TSV",
        )
        spans = {}
        for line in counted.splitlines():
            if line:
                xid, orders, unnamed, first_lsn, last_lsn = line.split("\t")
                spans[xid] = EventSpan(
                    int(first_lsn),
                    int(last_lsn),
                    frozenset(int(o) for o in orders.split(",") if o),
                    int(unnamed),
                )
        return spans

    def _select_list(
        self, replica: ReplicaTable, columns: dict[str, SourceColumn], upcaster: Upcaster
    ) -> tuple[list[str], list[str]]:
        """One SELECT expression per source column (in `columns` order) and the checks."""
        defaults = self._deleted_row_defaults(replica)
        select: list[str] = []
        checks = [
            "op IN ('c', 'r', 'u', 'd')",
            "if(op = 'd', isNotNull(before), isNotNull(after))",
        ]
        for source_name, column in columns.items():
            ctype = column.ctype
            if ctype.avro_sql is None or column.name in upcaster.retypes:
                raise FastPathUnsupported(f"column {column.name} ({ctype.clickhouse})")
            target = quote(ctype.clickhouse)

            def converted(image: str, ctype: Any = ctype, source_name: str = source_name) -> str:
                return ctype.avro_sql.format(f"tupleElement({image}, {quote(source_name)})")

            def check(image: str, ctype: Any = ctype, source_name: str = source_name) -> str:
                value = f"tupleElement({image}, {quote(source_name)})"
                return f"ifNull({ctype.avro_check.format(value)}, 1)"

            after = f"CAST({converted('after')}, {target})"
            if column.name in replica.key_columns:
                deleted = f"CAST({converted('before')}, {target})"
                if ctype.avro_check:
                    checks.append(f"(op != 'd' OR {check('before')})")
            else:
                deleted = defaults.get(column.name) or f"defaultValueOfTypeName({target})"
            if ctype.avro_check:
                checks.append(f"(op = 'd' OR {check('after')})")
            select.append(f"if(op = 'd', {deleted}, {after})")
        return select, checks

    def _deleted_row_defaults(self, replica: ReplicaTable) -> dict[str, str]:
        """The DEFAULT expression of each column that has one (a Postgres default): what a
        deletion marker, which names only the key, gets in the other columns. A default computed
        from an ephemeral input column is left out: that input is empty in a deletion marker,
        which `defaultValueOfTypeName` reproduces."""
        cache_key = (replica.qualified, tuple(replica.columns))
        if cache_key not in self._defaults:
            rows = self.ch.rows(
                "SELECT name, type, default_expression FROM system.columns "
                f"WHERE database = {quote(replica.database)} AND table = {quote(replica.name)} "
                "AND default_kind = 'DEFAULT'"
            )
            self._defaults[cache_key] = {
                r["name"]: f"CAST({r['default_expression']}, {quote(r['type'])})"
                for r in rows
                if INPUT_SUFFIX not in r["default_expression"]
            }
        return self._defaults[cache_key]
