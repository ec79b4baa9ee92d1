"""What `projector rebuild` and `projector pause | resume` ask of the running projector.

The live projection keeps serving and updating during a rebuild, and only the process applying
batches can keep a version being built exact (every batch must reach it, and a backfill chunk
must not interleave with a batch: projector/read_models/maintenance.py). So the command does not build
anything itself while a projector runs: it records a request (a row of `ops_requests` in the
control database) and follows the state the projector persists; the projector takes the
requests between batches (`take_requests`, from `Projector._ensure_read_models`, with no batch
in flight and no replay pending) and builds the version a chunk at a time, exactly like the
backfill of a changed definition. Everything a rebuild needs to resume is in ClickHouse: the
request, the version's row in `read_model_versions` and its backfill checkpoint, so Ctrl-C on
the command leaves the job running and a SIGKILL of the projector resumes it.

With the embedded chDB backend one process owns the data directory and no projector runs
beside the command; there it records the request and runs the same job in-process
(`run_here`).

A request's states:

    requested ──(taken by the projector between batches)──> taken (detail: the version) ─┐
        │                                                                                 │
        └──(refused: RebuildRefused, nothing changed)──> failed                           │
                                                                                          v
    the version's own states (read_model_versions, projector/read_models/maintenance.py):
      building ──(last chunk, verified)──> serving ──(rollback)──> previous ──(drop-old)──> retired
         │   └──(--no-swap)──> built ──(--swap)──> serving     previous ──(rollback)──> serving
         └──(verification finds a difference / a definition fails)──> failed
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from projector.clickhouse import ClickHouse, ident, quote
from projector.errors import RebuildRefused
from projector.read_models.maintenance import BUILDING, ReadModelMaintainer

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
                ["id String", "action LowCardinality(String)", "target String", "options String",
                 "state LowCardinality(String)", "detail String", "seq UInt64",
                 "recorded_at DateTime64(3) DEFAULT now64(3)"],
                "ReplacingMergeTree", "seq", "id", deduplicate=False,
            )
        )  # fmt: skip

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


def take_requests(requests: OpsRequests, maintainer: ReadModelMaintainer) -> list[str]:
    """Act on every pending request (call between batches, after `maintainer.ensure()`); a
    line per request. A rebuild is taken (its version starts building, the backfill steps do
    the rest); a swap, rollback or drop is done at once. A refusal changes nothing."""
    return [
        requests.carry_out(request, partial(_act, request, maintainer))
        for request in requests.pending()
        if "." not in request.target  # SCHEMA.TABLE is a replica table's: replica_rebuild.py
    ]


def _act(request: Request, maintainer: ReadModelMaintainer) -> tuple[str, str, str]:
    if request.action == REBUILD:
        no_swap = "no-swap" in request.options.split(",")
        version = maintainer.start_rebuild(request.target, request.id, no_swap)
        return TAKEN, version.version, f"rebuilding {request.target} as version {version.version}"
    if request.action == SWAP:
        line = maintainer.swap_built(request.target)
    elif request.action == ROLLBACK:
        line = maintainer.rollback(request.target)
    elif request.action == DROP_OLD:
        line = maintainer.drop_old(request.target)
    else:
        raise RebuildRefused(f"unknown request {request.action!r}")
    return DONE, line, line


def run_here(
    requests: OpsRequests, maintainer: ReadModelMaintainer,
    on_step: Callable[[str], None] = lambda version: None,
) -> list[str]:  # fmt: skip
    """The projector's part, in this process (chDB: no projector runs beside the command):
    take the pending requests and build until nothing builds, calling `on_step` with the
    version building after each chunk. The same steps, in the same order as `projector run`
    takes them."""
    lines = list(maintainer.ensure())
    lines += maintainer.finish_open_backfill()
    lines += take_requests(requests, maintainer)
    while maintainer.building:
        building = next(v.version for vs in maintainer.active.values() for v in vs
                        if v.state == BUILDING)  # fmt: skip
        step = maintainer.backfill_step()
        if step is not None:
            lines.append(step)
        on_step(building)
    return lines


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
                    table, ["table String", "paused UInt8", "seq UInt64",
                            "recorded_at DateTime64(3) DEFAULT now64(3)"],
                    "ReplacingMergeTree", "seq", "table", deduplicate=False,
                )
            )  # fmt: skip

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
