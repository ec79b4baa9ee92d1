"""The dead-letter queue: messages that cannot be applied, kept with their provenance.

Two places, on purpose: a ClickHouse table (`projector.dlq`, counted and queried by
`projector dlq list | show`, written under the batch's deduplication token and keyed by
topic/partition/offset, so it is exact across replays) and a Kafka topic (for tools that react to
dead letters; at-least-once, with provenance headers).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from projector.clickhouse import ClickHouse, ident, insert_statement, quote
from projector.commit.checkpoint import BatchRange
from projector.errors import PoisonMessage
from projector.messages import RawMessage
from projector.redaction import redact


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    stage: str  # decode | schema | convert
    error: str

    @classmethod
    def of(cls, message: RawMessage, exc: PoisonMessage) -> DeadLetter:
        return cls(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            message.value,
            exc.stage,
            redact(exc.reason),
        )

    def row(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key_b64": _b64(self.key),
            "value_b64": _b64(self.value),
            "stage": self.stage,
            "error": self.error,
            "dead_at": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "replayed": 0,
            "version": 1,
        }


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


class DeadLetterStore:
    def __init__(self, ch: ClickHouse, database: str, projection: str = "replica") -> None:
        self.ch = ch
        self.database = database
        self.table = f"{ident(database)}.dlq"
        self.projection = projection

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.database))
        self.ch.execute(
            topology.create_table(
                self.table,
                [
                    "topic String",
                    "`partition` Int32",
                    "`offset` Int64",
                    "key_b64 Nullable(String)",
                    "value_b64 Nullable(String)",
                    "stage LowCardinality(String)",
                    "error String",
                    "dead_at DateTime64(3, 'UTC')",
                    "replayed UInt8",
                    "version UInt64",
                ],
                "ReplacingMergeTree",
                "version",
                "(topic, partition, offset)",
            )
        )

    def add(self, batch: BatchRange, letters: list[DeadLetter]) -> None:
        rows = [letter.row() for letter in letters]
        self.ch.execute(
            insert_statement(self.table, list(rows[0]), rows, batch.token(self.projection, "dlq"))
        )

    def count(self, include_replayed: bool = False) -> int:
        where = "" if include_replayed else "WHERE replayed = 0"
        return int(self.ch.rows(f"SELECT count() AS n FROM {self.table} FINAL {where}")[0]["n"])

    def by_topic(self) -> dict[str, tuple[int, str]]:
        """Per topic: its dead letters not replayed, and the newest one's error."""
        rows = self.ch.rows(
            f"SELECT topic, count() AS n, argMax(error, dead_at) AS newest FROM {self.table} "
            f"FINAL WHERE replayed = 0 GROUP BY topic"
        )
        return {row["topic"]: (int(row["n"]), row["newest"]) for row in rows}

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.ch.rows(
            f"SELECT topic, partition, offset, stage, error, dead_at FROM {self.table} FINAL "
            f"WHERE replayed = 0 ORDER BY dead_at, topic, partition, offset LIMIT {int(limit)}"
        )

    def get(self, topic: str, partition: int, offset: int) -> dict[str, Any] | None:
        rows = self.ch.rows(
            f"SELECT * FROM {self.table} FINAL WHERE topic = {quote(topic)} "
            f"AND partition = {int(partition)} AND offset = {int(offset)}"
        )
        return rows[0] if rows else None

    def mark_replayed(self, letter: dict[str, Any]) -> None:
        row = {**letter, "replayed": 1, "version": int(letter["version"]) + 1}
        token = f"dlq-replayed|{letter['topic']}|{letter['partition']}|{letter['offset']}|{row['version']}"
        self.ch.execute(insert_statement(self.table, list(row), [row], token))

    @staticmethod
    def decode_bytes(value: str | None) -> bytes | None:
        return None if value is None else base64.b64decode(value)
