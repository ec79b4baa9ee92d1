"""Rebuilding a read model while it serves: what the projector does with a read-model request.

The live projection keeps serving and updating during a rebuild, and only the process applying
batches can keep a version being built exact (every batch must reach it, and a backfill chunk
must not interleave with a batch: projector/read_models/maintenance.py). So the command does not build
anything itself while a projector runs: it records a request (a row of `ops_requests` in the
control database) and follows the state the projector persists; the projector takes the
requests between batches (`take_requests`, from the read-model duty, with no batch in flight
and no replay pending) and builds the version a chunk at a time, exactly like the
backfill of a changed definition. Everything a rebuild needs to resume is in ClickHouse: the
request, the version's row in `read_model_versions` and its backfill checkpoint, so Ctrl-C on
the command leaves the job running and a SIGKILL of the projector resumes it.

With the embedded chDB backend one process owns the data directory and no projector runs
beside the command; there it records the request and drives the same duty in-process
(projector/run/upkeep.py, `keep_read_models_here`).

A request's states:

    requested ──(taken by the projector between batches)──> taken (detail: the version) ─┐
        │                                                                                 │
        └──(refused: RebuildRefused, nothing changed)──> failed                           │
                                                                                          v
    the version's own states (read_model_versions, projector/read_models/versions.py):
      building ──(last chunk, verified)──> serving ──(rollback)──> previous ──(drop-old)──> retired
         │   └──(--no-swap)──> built ──(--swap)──> serving     previous ──(rollback)──> serving
         └──(verification finds a difference / a definition fails)──> failed
"""

from __future__ import annotations

from functools import partial

from projector.clickhouse import ident
from projector.errors import RebuildRefused
from projector.operations.requests import (
    DONE,
    DROP_OLD,
    REBUILD,
    ROLLBACK,
    SWAP,
    TAKEN,
    OpsRequests,
    Request,
)
from projector.read_models.maintenance import ReadModelMaintainer


def take_requests(requests: OpsRequests, maintainer: ReadModelMaintainer) -> list[str]:
    """Act on every pending request (call between batches, after `family_versions.ensure()`);
    a line per request. A rebuild is taken (its version starts building, the backfill steps do
    the rest); a swap, rollback or drop is done at once. A refusal changes nothing."""
    return [
        requests.carry_out(request, partial(_act, request, maintainer))
        for request in requests.pending()
        if "." not in request.target  # SCHEMA.TABLE is a replica table's: replica_rebuild.py
    ]


def _act(request: Request, maintainer: ReadModelMaintainer) -> tuple[str, str, str]:
    versions = maintainer.family_versions
    if request.action == REBUILD:
        no_swap = "no-swap" in request.options.split(",")
        version = versions.start_rebuild(request.target, request.id, no_swap)
        return TAKEN, version.version, f"rebuilding {request.target} as version {version.version}"
    if request.action == SWAP:
        line = versions.swap_built(request.target)
    elif request.action == ROLLBACK:
        line = versions.rollback(request.target)
    elif request.action == DROP_OLD:
        line = versions.drop_old(request.target)
    else:
        raise RebuildRefused(f"unknown request {request.action!r}")
    return DONE, line, line


def entity_rows(maintainer: ReadModelMaintainer, family: str, version: str) -> int:
    """The rows of a version's entity table (`<entity>__<version>`, FINAL): what a rebuild of
    `family` built."""
    entity = maintainer.family_versions.family_named(family).entity.name
    table = f"{ident(maintainer.database)}.{ident(f'{entity}__{version}')}"
    (rows,) = maintainer.ch.rows(f"SELECT count() AS n FROM {table} FINAL")
    return int(rows["n"])
