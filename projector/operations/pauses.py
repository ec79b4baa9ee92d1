"""`projector pause | resume`: which replica tables are held back, asked and honoured.

The command records what it wants; the running projector reads it between batches (the pause
duty, projector/run/duties.py), pauses or resumes the table's partitions after a whole batch and
records what it did, which the command waits for.
"""

from __future__ import annotations

import time

from projector.clickhouse import ClickHouse, ident, quote


class TablePauses:
    """Which replica tables are paused: what `projector pause | resume` wants (`table_pauses`)
    and what the projector has done about it (`table_pause_states`), latest row per table."""

    def __init__(self, ch: ClickHouse, control_database: str) -> None:
        self.ch = ch
        self.control_database = control_database
        self.wanted_table = f"{ident(control_database)}.table_pauses"
        self.state_table = f"{ident(control_database)}.table_pause_states"

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.control_database))
        for table in (self.wanted_table, self.state_table):
            self.ch.execute(
                topology.create_table(
                    table,
                    [
                        "table String",
                        "paused UInt8",
                        "seq UInt64",
                        "recorded_at DateTime64(3) DEFAULT now64(3)",
                    ],
                    "ReplacingMergeTree",
                    "seq",
                    "table",
                    deduplicate=False,
                )
            )

    def want(self, table: str, paused: bool) -> None:
        self._write(self.wanted_table, table, paused)

    def record(self, table: str, paused: bool) -> None:
        self._write(self.state_table, table, paused)

    def _write(self, target: str, table: str, paused: bool) -> None:
        self.ch.execute(
            f"INSERT INTO {target} (table, paused, seq) VALUES ({quote(table)}, {int(paused)}, "
            f"{time.time_ns()})"
        )

    def wanted(self) -> set[str]:
        """The tables (SCHEMA.TABLE) asked to be paused."""
        return self._paused(self.wanted_table)

    def honoured(self) -> set[str]:
        """The tables a projector has paused."""
        return self._paused(self.state_table)

    def _paused(self, table: str) -> set[str]:
        return {
            r["table"] for r in self.ch.rows(f"SELECT table FROM {table} FINAL WHERE paused = 1")
        }
