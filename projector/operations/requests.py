"""Requests operators make of the running projector: the `ops_requests` control table.

`projector rebuild` (read models and replica tables) does not build anything itself while a
projector runs: it records a request (a row of `ops_requests` in the control database) and
follows the state the projector persists; the projector takes requests between batches (the run
loop's duties: projector/run/duties.py) and settles each. Everything a job needs to resume is in
ClickHouse, so Ctrl-C on the command leaves the job running and a SIGKILL of the projector
resumes it. What a request of each kind does: projector/operations/read_model_rebuild.py and
projector/operations/replica_rebuild.py.

A request's states:

    requested ──(taken by the projector between batches)──> taken (detail: the job) ──> done
        │
        └──(refused: RebuildRefused, nothing changed)──> failed
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from projector.clickhouse import ClickHouse, ident, quote
from projector.errors import RebuildRefused

REQUESTED, TAKEN, DONE, FAILED = "requested", "taken", "done", "failed"
REBUILD, SWAP, ROLLBACK, DROP_OLD = "rebuild", "swap", "rollback", "drop-old"


@dataclass
class Request:
    id: str
    action: str
    target: str
    options: str
    state: str
    detail: str


class OpsRequests:
    """The `ops_requests` control table: one row per request, its latest state winning."""

    def __init__(self, ch: ClickHouse, control_database: str) -> None:
        self.ch = ch
        self.control_database = control_database
        self.table = f"{ident(control_database)}.ops_requests"

    def create(self) -> None:
        topology = self.ch.topology
        self.ch.execute(topology.create_database(self.control_database))
        self.ch.execute(
            topology.create_table(
                self.table,
                [
                    "id String",
                    "action LowCardinality(String)",
                    "target String",
                    "options String",
                    "state LowCardinality(String)",
                    "detail String",
                    "seq UInt64",
                    "recorded_at DateTime64(3) DEFAULT now64(3)",
                ],
                "ReplacingMergeTree",
                "seq",
                "id",
                deduplicate=False,
            )
        )

    def ask(self, action: str, target: str, options: str = "") -> Request:
        request = Request(uuid.uuid4().hex[:8], action, target, options, REQUESTED, "")
        self._write(request)
        return request

    def settle(self, request: Request, state: str, detail: str = "") -> None:
        request.state, request.detail = state, detail
        self._write(request)

    def carry_out(self, request: Request, act: Callable[[], tuple[str, str, str]]) -> str:
        """Do a request and settle it: `act` returns (state, detail, line) — TAKEN for a job
        that goes on, DONE when done — or raises RebuildRefused, which settles it FAILED with
        the reason and changes nothing. The line says what became of it."""
        try:
            state, detail, line = act()
        except RebuildRefused as exc:
            self.settle(request, FAILED, str(exc))
            return f"refused {request.action} {request.target}: {exc}"
        self.settle(request, state, detail)
        return line

    def _write(self, request: Request) -> None:
        self.ch.execute(
            f"INSERT INTO {self.table} (id, action, target, options, state, detail, seq) VALUES "
            f"({quote(request.id)}, {quote(request.action)}, {quote(request.target)}, "
            f"{quote(request.options)}, {quote(request.state)}, {quote(request.detail[:2000])}, "
            f"{time.time_ns()})"
        )

    def pending(self) -> list[Request]:
        return self._read(f"state = {quote(REQUESTED)}")

    def get(self, request_id: str) -> Request | None:
        found = self._read(f"id = {quote(request_id)}")
        return found[0] if found else None

    def _read(self, where: str) -> list[Request]:
        return [
            Request(r["id"], r["action"], r["target"], r["options"], r["state"], r["detail"])
            for r in self.ch.rows(
                f"SELECT id, action, target, options, state, detail FROM {self.table} FINAL "
                f"WHERE {where} ORDER BY seq"
            )
        ]
