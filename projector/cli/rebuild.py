"""`projector rebuild`: a read model's family from the replicas (projector/operations/requests.py,
read_model_rebuild.py), or a replica table from Kafka or a snapshot (replica_rebuild.py); asked
of the running projector and followed, or done here on chDB."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from projector.cli.common import ConfigOption, console, fail, load_settings
from projector.cli.read_models import open_maintainer
from projector.config import ProjectorConfig
from projector.errors import ProjectorError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from projector.operations.replica_rebuild import LiveNext, ReplicaRebuild, ReplicaRebuilds
    from projector.operations.requests import OpsRequests, Request
    from projector.read_models.maintenance import ReadModelMaintainer

FOLLOW_POLL_S = 0.5


def rebuild(
    name: str = typer.Argument(
        ...,
        help="A read model or its family (`projector read-models list`), or a replica table as SCHEMA.TABLE.",
    ),
    source: str | None = typer.Option(
        None,
        "--from",
        help="Where to rebuild from: replicas (a read model, the default); kafka or snapshot (a replica table, SCHEMA.TABLE; by default kafka when Kafka holds the table's whole history, else snapshot).",
    ),
    where: str | None = typer.Option(
        None,
        "--where",
        help='A replica table only: re-read just its rows matching this Postgres condition (e.g. "id BETWEEN 100 AND 200"), through a Debezium snapshot into the live table, then verify those rows; implies --from snapshot.',
    ),
    no_swap: bool = typer.Option(
        False, "--no-swap", help="Build and verify it, but leave the serving version serving."
    ),
    swap: bool = typer.Option(False, "--swap", help="Serve the version a --no-swap rebuild built."),
    rollback: bool = typer.Option(
        False, "--rollback", help="Serve the version the last rebuild replaced again."
    ),
    drop_old: bool = typer.Option(
        False, "--drop-old", help="Drop the replaced version (no rollback after this)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; change nothing."),
    follow: bool = typer.Option(
        True, help="Follow the rebuild to its end (Ctrl-C stops following, not the rebuild)."
    ),
    config_file: Path | None = ConfigOption,
) -> None:
    """Rebuild a read model's family from the replicas while the projection keeps serving: a
    new version is built beside the serving one, kept by every batch, verified against its
    definition, then swapped in (each view in one statement); the replaced version is kept for
    `--rollback` until `--drop-old`. A replica table (SCHEMA.TABLE) is rebuilt the same way from
    Kafka or a Debezium snapshot; with `--where`, only its rows matching the condition are read
    again, into the live table. With a ClickHouse server the running projector does the work
    between batches (this command asks and follows); with chDB (no projector may run) this
    command does it itself, or records it for the next `projector run`."""
    from projector.operations.requests import (
        DROP_OLD,
        REBUILD,
        ROLLBACK,
        SWAP,
        OpsRequests,
    )
    from projector.run.upkeep import keep_read_models_here

    actions = [a for a, on in ((SWAP, swap), (ROLLBACK, rollback), (DROP_OLD, drop_old)) if on]
    if len(actions) > 1 or (actions and no_swap):
        fail(
            "give at most one of --swap, --rollback, --drop-old (and --no-swap only to rebuild)",
            code=2,
        )
    action = actions[0] if actions else REBUILD
    config = load_settings(config_file)
    if where is not None:
        if "." not in name or action != REBUILD:
            fail("--where re-reads rows of a replica table (SCHEMA.TABLE): no other option", code=2)
        if (source or "snapshot") != "snapshot":
            fail(
                f"--where re-reads rows from Postgres: --from snapshot, not --from {source}", code=2
            )
        if not where.strip():
            fail("--where needs a Postgres condition", code=2)
        source = "snapshot"
    if "." in name:  # SCHEMA.TABLE: a replica table
        _rebuild_replica(name, source or "auto", action, no_swap, dry_run, follow, config, where)
        return
    if (source or "replicas") != "replicas":
        fail(
            f"--from {source}: only read models can be rebuilt so far (from the replicas); to "
            "rebuild a replica table, `projector table reset SCHEMA.TABLE` re-snapshots it "
            "through Debezium",
            code=2,
        )
    maintainer = open_maintainer(config_file)
    try:
        family = maintainer.family_versions.family_named(name)
    except ProjectorError as exc:
        fail(str(exc), code=2)
        raise
    versions = [v for v in maintainer.family_versions.versions() if v["family"] == family.name]
    if dry_run:
        for line in _rebuild_plan(action, family.name, family.version, versions, no_swap):
            console.print(line, highlight=False)
        return
    requests = OpsRequests(maintainer.ch, config.control_database)
    requests.create()
    request = requests.ask(action, name, "no-swap" if no_swap else "")
    if config.backend == "chdb":
        # One process owns the data directory: no projector runs beside us; do its part here.
        started = time.monotonic()
        if action != REBUILD:  # done at once: no progress to show
            keep_read_models_here(maintainer, requests)
            _rebuild_report(requests, maintainer, request.id, family.name, 0)
            return
        with _rebuild_progress() as progress:
            task = progress.add_task(family.name, total=None, rate="")

            def step(version: str) -> None:
                for row in maintainer.family_versions.versions():
                    if row["version"] == version:
                        _show_progress(
                            progress, task, row, config.read_model_backfill_chunk_keys, started
                        )

            keep_read_models_here(maintainer, requests, step)
        _rebuild_report(requests, maintainer, request.id, family.name, time.monotonic() - started)
        return
    console.print(
        f"asked the running projector ({action} {name}, request {request.id})", highlight=False
    )
    if not follow:
        return
    try:
        started = time.monotonic()
        _follow_request(
            requests, maintainer, request.id, family.name, config.read_model_backfill_chunk_keys
        )
    except KeyboardInterrupt:
        console.print(
            f"stopped following; the projector goes on (`projector rebuild {name} "
            "--dry-run` or `projector read-models list` shows where it stands)"
        )
        raise typer.Exit(130) from None
    _rebuild_report(requests, maintainer, request.id, family.name, time.monotonic() - started)


def _rebuild_replica(
    table: str,
    source: str,
    action: str,
    no_swap: bool,
    dry_run: bool,
    follow: bool,
    config: ProjectorConfig,
    where: str | None = None,
) -> None:
    """`projector rebuild SCHEMA.TABLE [--from kafka|snapshot] [--where CONDITION]`
    (projector/operations/replica_rebuild.py, partial_reread.py)."""
    from projector.config import open_backend
    from projector.kafka import table_topic
    from projector.operations.partial_reread import count_matching
    from projector.operations.replica_rebuild import rebuild_options
    from projector.operations.replica_rebuild_jobs import BUILDING, REREAD, SNAPSHOT, SNAPSHOTTING
    from projector.operations.replica_rebuild_progress import (
        kafka_history,
        live_positions,
        open_replica_rebuilds,
    )
    from projector.operations.requests import REBUILD, OpsRequests
    from projector.run.upkeep import rebuild_replicas_here

    if action == REBUILD and source not in ("kafka", "snapshot", "auto"):
        fail(
            f"a replica table is rebuilt --from kafka or --from snapshot (not --from {source})",
            code=2,
        )
    if no_swap:
        fail("--no-swap is for read models; a replica table is verified, then swapped", code=2)
    ch = open_backend(config)
    requests = OpsRequests(ch, config.control_database)
    requests.create()
    rebuilds = open_replica_rebuilds(config, ch)
    live_next = live_positions(config, ch)
    topic = table_topic(config.topic_prefix, table)
    if dry_run:
        jobs = [j for j in rebuilds.job_store.jobs() if j.table == table]
        console.print(
            f"{table}: " + (", ".join(f"job {j.id} {j.state}" for j in jobs) or "no rebuild kept"),
            highlight=False,
        )
        if action == REBUILD and where:
            if not config.source_dsn:
                fail("--where compares with Postgres: no source database is configured", code=2)
            try:
                matching = count_matching(str(config.source_dsn), table, where)
            except ProjectorError as exc:
                fail(str(exc), code=2)
                raise
            console.print(
                f"would ask Debezium for an incremental snapshot of the {matching:,} row(s) of "
                f"{table} where {where} (as Postgres has them now), apply them to the live "
                "table as they arrive, then compare those rows with Postgres; nothing is "
                "swapped, and rows Postgres no longer has are not removed (`projector verify` "
                "finds them)",
                highlight=False,
            )
        elif action == REBUILD:
            lows, complete = kafka_history(rebuilds, topic)
            if source == "snapshot" or (source == "auto" and not complete):
                console.print(
                    "would rebuild it from a Debezium incremental snapshot"
                    + (
                        ""
                        if complete
                        else f" ({topic} no longer holds its whole "
                        f"history: earliest offsets {lows})"
                    )
                    + " into a shadow table that follows the live one from its "
                    "position, wait until Debezium has read the table whole, verify "
                    "it against Postgres and exchange them, keeping the previous "
                    "table for --rollback",
                    highlight=False,
                )
            else:
                console.print(
                    f"would rebuild it from {topic} (earliest offsets {lows}) into a "
                    "shadow table beside it, catch it up with the live table, verify "
                    "and exchange them, keeping the previous table for --rollback",
                    highlight=False,
                )
        else:
            console.print(f"would {action} (done by the projector between batches)")
        return
    request = requests.ask(action, table, rebuild_options(source, where or ""))
    started = time.monotonic()
    if config.backend == "chdb":  # no projector runs beside us: its part here, the table still
        try:
            if action != REBUILD:  # done at once, no progress to show
                rebuild_replicas_here(rebuilds, requests, live_next)
            else:
                with _rebuild_progress() as progress:
                    task = progress.add_task(table, total=None, rate="")
                    shown = 0.0

                    def show(job: ReplicaRebuild) -> None:
                        nonlocal shown  # looked at twice a second: each look costs two queries
                        if time.monotonic() - shown >= 0.5:
                            shown = time.monotonic()
                            _show_replica_progress(
                                progress, task, rebuilds, job, live_next, started
                            )

                    rebuild_replicas_here(rebuilds, requests, live_next, show)
        finally:
            rebuilds.close()  # its reading threads end before the interpreter does
    else:
        console.print(
            f"asked the running projector ({action} {table}, request {request.id})",
            highlight=False,
        )
        if not follow:
            return
        try:
            with _rebuild_progress() as progress:
                task = progress.add_task(table, total=None, rate="")
                while True:
                    asked = requests.get(request.id)
                    job = (
                        None
                        if asked is None or asked.state != "taken"
                        else rebuilds.job_store.job(asked.detail)
                    )
                    if asked is not None and asked.state not in ("requested", "taken"):
                        break
                    if job is not None:
                        if job.state not in BUILDING:
                            break
                        _show_replica_progress(progress, task, rebuilds, job, live_next, started)
                    time.sleep(FOLLOW_POLL_S)
        except KeyboardInterrupt:
            console.print("stopped following; the projector goes on")
            raise typer.Exit(130) from None
    taken = _taken_request(requests, request.id, "the request was not taken")
    if taken is None:
        return
    job = rebuilds.job_store.job(taken.detail)
    assert job is not None
    if job.state == SNAPSHOTTING and config.backend == "chdb":
        what = "re-reads and verifies the rows" if job.where else "builds, verifies and swaps it"
        console.print(
            f"{table} job {job.id}: Debezium was asked for a snapshot of the "
            f"{'rows where ' + job.where if job.where else 'table'}; "
            "with chDB the command cannot apply it (the live table must move for the "
            "snapshot's reads to arrive, and one process owns the data): the next "
            f"`projector run` {what}",
            highlight=False,
        )
        return
    origin = "a Debezium snapshot" if job.source == SNAPSHOT else "Kafka"
    console.print(
        f"{table} job {job.id} (from {origin}): {job.state} in "
        f"{time.monotonic() - started:.1f} s; {job.detail}",
        highlight=False,
    )
    if job.state == "failed":
        raise typer.Exit(1)
    if job.state == REREAD:
        return
    console.print(
        f"`projector rebuild {table} --rollback` serves the previous table again, "
        f"`projector rebuild {table} --drop-old` drops it",
        highlight=False,
    )


def _show_replica_progress(
    progress: Progress,
    task: TaskID,
    rebuilds: ReplicaRebuilds,
    job: ReplicaRebuild,
    live_next: LiveNext,
    started: float,
) -> None:
    from projector.operations.replica_rebuild_progress import job_progress

    applied, total = job_progress(rebuilds, job, live_next)
    rate = applied / max(1e-3, time.monotonic() - started)
    phase = {"snapshotting": "snapshotting, ", "catching-up": "catching up, "}.get(job.state, "")
    progress.update(
        task,
        completed=applied,
        total=max(total, applied),
        rate=f"events ({phase}{rate:,.0f} events/s)",
    )


def _rebuild_plan(
    action: str, family: str, definition: str, versions: list[dict[str, Any]], no_swap: bool
) -> list[str]:
    states = ", ".join(f"{v['version']} {v['state']}" for v in versions) or "no version yet"
    lines = [f"{family}: {states}"]
    if action == "rebuild":
        lines.append(
            f"would build version {definition}r<request> from the replicas beside the "
            "serving one, kept by every batch, verify it against its definition, and "
            + (
                "leave it built (--no-swap)"
                if no_swap
                else "swap it in, keeping the serving version for --rollback"
            )
        )
    else:
        lines.append(f"would {action} (done by the projector between batches)")
    return lines


def _rebuild_progress() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}, ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def _show_progress(
    progress: Progress, task: TaskID, version: dict[str, Any], chunk_keys: int, started: float
) -> None:
    done, total = version["done_steps"], version["steps"]  # chunks built, then verified
    rate = done * chunk_keys / max(1e-3, time.monotonic() - started)
    progress.update(task, completed=done, total=total, rate=f"steps, {rate:,.0f} keys/s")


def _follow_request(
    requests: OpsRequests,
    maintainer: ReadModelMaintainer,
    request_id: str,
    family: str,
    chunk_keys: int,
) -> None:
    """Follow a request until the projector has settled it (and, for a rebuild, its version
    is built): a progress bar over the backfill's chunks."""
    with _rebuild_progress() as progress:
        task = progress.add_task(family, total=None, rate="")
        waited = time.monotonic()
        while True:
            request = requests.get(request_id)
            if request is None or request.state == "requested":
                if time.monotonic() - waited > 30:
                    progress.update(
                        task, description=f"{family} (waiting: is `projector run` running?)"
                    )
                time.sleep(FOLLOW_POLL_S)
                continue
            if request.state != "taken":
                return
            version = next(
                (
                    v
                    for v in maintainer.family_versions.versions()
                    if v["version"] == request.detail
                ),
                None,
            )
            if version is None or version["state"] != "building":
                return
            _show_progress(progress, task, version, chunk_keys, waited)
            time.sleep(FOLLOW_POLL_S)


def _taken_request(requests: OpsRequests, request_id: str, not_taken: str) -> Request | None:
    """The request when the projector took it (a job goes on); otherwise says what became of
    it — not taken, refused (exit 1), or done with its line — and returns None."""
    request = requests.get(request_id)
    if request is None or request.state == "requested":
        fail(not_taken)
    assert request is not None
    if request.state == "failed":
        fail(f"refused: {request.detail}")
    if request.state == "done":
        console.print(request.detail, highlight=False)
        return None
    return request


def _rebuild_report(
    requests: OpsRequests,
    maintainer: ReadModelMaintainer,
    request_id: str,
    family: str,
    seconds: float,
) -> None:
    """What became of a request: refused, done, or the rebuilt version's state and size."""
    from projector.operations.read_model_rebuild import entity_rows

    request = _taken_request(
        requests, request_id, "the request was not taken (does this projector keep read models?)"
    )
    if request is None:
        return
    found = [v for v in maintainer.family_versions.versions() if v["version"] == request.detail]
    if not found:
        fail(f"version {request.detail} was retired meanwhile (a newer version replaced it)")
    version = found[0]
    rows = entity_rows(maintainer, family, request.detail)
    console.print(
        f"{family} version {request.detail}: {version['state']}; {rows:,} "
        f"entity rows, {version['chunks']} chunk(s), {seconds:.1f} s",
        highlight=False,
    )
    if version["state"] == "failed":
        fail(str(version["error"]))
    if version["state"] == "serving":
        console.print(
            f"the replaced version is kept: `projector rebuild {family} --rollback` "
            f"serves it again, `projector rebuild {family} --drop-old` drops it",
            highlight=False,
        )
    elif version["state"] == "built":
        console.print(
            f"verified, not serving: `projector rebuild {family} --swap` serves it",
            highlight=False,
        )
