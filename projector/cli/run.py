"""`projector run`: the projector itself, until stopped or until a finish line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from projector.cli.common import (
    ConfigOption,
    QueryHostOption,
    QueryPortOption,
    fail,
    load_settings,
)
from projector.clickhouse import ParameterisedClickHouse
from projector.config import ProjectorConfig
from projector.errors import ConfigError, ProjectorError
from projector.redaction import configure_logging

if TYPE_CHECKING:
    from projector.commit.finish_line import Finish
    from queries.server import BackgroundServer


def run(
    until_caught_up: bool = typer.Option(
        False,
        "--until-caught-up",
        help="Exit 0 once every change committed in Postgres when the command starts is applied "
        "(reads the source's WAL position: PROJECTOR_SOURCE_DSN, or the connector's PG_*/CDC_* "
        "settings; needs the transaction topic).",
    ),
    until_lsn: str | None = typer.Option(
        None,
        "--until-lsn",
        metavar="LSN",
        help="Exit 0 once every change committed in Postgres up to LSN is applied, e.g. a "
        "writer's SELECT pg_current_wal_lsn() after its commit (0/16B3748).",
    ),
    until_kafka_end: bool = typer.Option(
        False,
        "--until-kafka-end",
        help="Exit 0 once everything in Kafka when the command starts is applied (changes "
        "Debezium has not produced yet are not waited for).",
    ),
    serve_api: bool = typer.Option(
        False,
        "--serve",
        help="Also serve the query API and ops page from this process, through the projector's "
        "own ClickHouse (the way on chDB, which one process owns); at --host:--port, token "
        "PROJECTOR_API_TOKEN.",
    ),
    host: str | None = QueryHostOption,
    port: int | None = QueryPortOption,
    config_file: Path | None = ConfigOption,
) -> None:
    """Consume the change topics and apply them to ClickHouse (exactly-once effect); until
    stopped (Ctrl-C, SIGTERM), or until a finish line: docs/projector.md, "Finishing a run"."""
    import signal

    from projector.config import open_backend
    from projector.run.loop import Projector

    # A stop asked for while the run starts up (opening ClickHouse takes seconds) is honoured
    # once the projector exists, instead of killing the process half-way.
    stop_asked: list[int] = []
    for asked in (signal.SIGTERM, signal.SIGINT):
        signal.signal(asked, lambda *_: stop_asked.append(1))
    configure_logging()
    logging.getLogger("projector").info("projector run starting (SIGTERM or Ctrl-C stops it)")
    config = load_settings(config_file)
    try:
        # The moment the run is asked to finish is now: the finish is fixed before anything runs.
        finish = _finish(config, until_caught_up, until_lsn, until_kafka_end)
    except ConfigError as exc:
        fail(str(exc), code=2)
        return
    except ProjectorError as exc:
        fail(str(exc))
        return
    try:
        backend = open_backend(config)
        if (host or port) and not serve_api:
            fail("--host and --port are where --serve listens: add --serve", code=2)
        api = _start_api(config, backend, host, port) if serve_api else None
        try:
            projector = Projector(config, backend)
            if stop_asked:
                projector.request_stop()
            code = projector.run(finish)
        finally:
            if api is not None and api.stop():
                # Close the engine while this thread still owns it: left to interpreter exit,
                # chDB's shutdown raced the service's threads and crashed (SIGSEGV) at times.
                backend.close()
    except ProjectorError as exc:
        fail(str(exc))
        return
    raise typer.Exit(code)


def _finish(
    config: ProjectorConfig, until_caught_up: bool, until_lsn: str | None, until_kafka_end: bool
) -> Finish | None:
    """The finish line the options ask for (projector/commit/finish_line.py), None: run until stopped."""
    from projector.commit.finish_line import Finish, source_position
    from projector.commit.transactions import parse_lsn

    chosen = [until_caught_up, until_lsn is not None, until_kafka_end]
    if sum(chosen) > 1:
        raise ConfigError("give at most one of --until-caught-up, --until-lsn, --until-kafka-end")
    if until_kafka_end:
        return Finish(kafka_end=True)
    if not (until_caught_up or until_lsn is not None):
        return None
    if not config.transaction_metadata:
        raise ConfigError(
            f"--until-{'caught-up' if until_caught_up else 'lsn'} follows Debezium's transaction "
            "topic, and PROJECTOR_TRANSACTION_METADATA is false: turn it on, or use "
            "--until-kafka-end (everything in Kafka now)"
        )
    lsn = source_position(config.source_dsn) if until_lsn is None else parse_lsn(until_lsn)
    return Finish(lsn=lsn)


def _start_api(
    config: ProjectorConfig, backend: ParameterisedClickHouse, host: str | None, port: int | None
) -> BackgroundServer:
    """`run --serve`: the query service on a thread, sharing the projector's backend object."""
    from queries.server import BackgroundServer

    api = BackgroundServer(config, backend, host or config.query_host, port or config.query_port)
    api.start()
    return api
