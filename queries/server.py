"""Starting the query service from the projector's settings: alone (`projector serve`, on a
ClickHouse server next to a separate `projector run`), or beside the projector in one process
(`projector run --serve`: chDB gives its data directory to one process, so there the service
queries through the projector's own backend object).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI

from projector.clickhouse import ParameterisedClickHouse
from projector.commit.checkpoint import PROJECTION
from projector.commit.ledger import TransactionLedger
from projector.config import ProjectorConfig, client_environment
from projector.errors import ConfigError
from projector.operations.status import read_model_sources
from projector.read_models.definitions import load_read_models
from projector.read_models.stage import read_ceilings
from queries.adhoc import SqlLimits
from queries.api import create_app
from queries.cache import ResultCache
from queries.consistency import ReadModelHealth, ReadPositions
from queries.errors import QueryDefinitionError
from queries.named import load_named_queries
from queries.ops import OpsMonitor
from queries.service import Limits, QueryService, Rows
from queries.sql_guard import Scope

log = logging.getLogger("queries")


@dataclass
class QueryServer:
    app: FastAPI
    service: QueryService
    monitor: OpsMonitor


def build_service(config: ProjectorConfig, ch: ParameterisedClickHouse) -> QueryService:
    """The framework-free service (also what `projector query` runs)."""
    try:
        queries = load_named_queries(config.query_dir)
    except QueryDefinitionError as exc:
        raise ConfigError(str(exc)) from exc
    known = {m.name for m in load_read_models(config.read_models_file)}
    for query in queries.values():
        unknown = sorted(set(query.read_models) - known)
        if unknown:
            raise ConfigError(f"named query {query.name} reads unknown read models {unknown}")
    sources = read_model_sources(config)
    ledger = TransactionLedger(ch, config.control_database, PROJECTION)
    return QueryService(
        ch,
        queries,
        ReadPositions(
            ledger,
            sources,
            # a read model stands where its stage has followed its sources
            partial(read_ceilings, ch, config.control_database)
            if config.maintain_read_models
            else None,
        ),
        ResultCache[Rows](config.query_cache_entries, config.query_cache_ttl_s),
        Limits(
            config.query_wait_ms,
            config.query_max_page,
            sql_limits(config),
            sql_max_concurrent=config.sql_max_concurrent,
            max_waiters=config.query_max_waiters,
            max_body_bytes=config.query_max_body_bytes,
        ),
        read_your_writes=config.transaction_metadata,
        sql_scope=token_scope(config),
        health=ReadModelHealth(ch, config.control_database)
        if config.maintain_read_models
        else None,
    )


def sql_limits(config: ProjectorConfig) -> SqlLimits:
    return SqlLimits(
        config.sql_max_rows,
        config.sql_max_seconds,
        config.sql_max_memory_bytes,
        config.sql_max_result_bytes,
        config.sql_max_bytes_to_read,
    )


def token_scope(config: ProjectorConfig) -> Scope:
    """What a query token reads: the read models and the replicas, not the projector's control
    database (checkpoints, the ledger, the DLQ with its raw messages)."""
    read_models, prefix = config.read_model_database, config.replica_prefix
    return Scope(
        lambda database: database == read_models or database.startswith(prefix),
        f"the read models ({read_models}) and the replicas ({prefix}*)",
    )


def build_server(config: ProjectorConfig, ch: ParameterisedClickHouse) -> QueryServer:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the ops sampler's requests
    if not config.api_token:
        raise ConfigError(
            "the query service needs an API token: set PROJECTOR_API_TOKEN (clients send it as "
            "'Authorization: Bearer <token>')"
        )
    service = build_service(config, ch)
    metrics_url = config.projector_metrics_url or (
        f"http://127.0.0.1:{config.metrics_port}/metrics" if config.metrics_port else None
    )
    monitor = OpsMonitor(
        ch,
        service.positions,
        config.control_database,
        config.kafka_bootstrap,
        metrics_url,
        client_environment(),
        interval_s=config.ops_sample_s,
        wal_warning_bytes=config.wal_retained_warning_bytes,
        transaction_topic=config.transaction_topic,
    )
    app = create_app(service, config.api_token, monitor.status)
    app.router.on_startup.append(monitor.start)
    app.router.on_shutdown.append(monitor.stop)
    return QueryServer(app, service, monitor)


def _uvicorn(app: FastAPI, host: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    )


def serve(config: ProjectorConfig, ch: ParameterisedClickHouse, host: str, port: int) -> None:
    """Run the service in this thread until SIGTERM / Ctrl-C."""
    server = build_server(config, ch)
    log.info("query service at http://%s:%d (ops page at /, API at /docs)", host, port)
    _uvicorn(server.app, host, port).run()


class BackgroundServer:
    """The service on a thread of its own, beside `projector run` (which keeps the main thread
    and its signal handlers)."""

    def __init__(self, config: ProjectorConfig, ch: ParameterisedClickHouse, host: str, port: int):
        self.server = build_server(config, ch)
        self._uvicorn = _uvicorn(self.server.app, host, port)
        self._uvicorn.install_signal_handlers = lambda: None  # the projector owns the signals
        self._thread = threading.Thread(target=self._uvicorn.run, name="query-service", daemon=True)
        self.address = f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("query service at %s (ops page at /, API at /docs)", self.address)

    def stop(self) -> bool:
        """Stop serving; True once no thread of the service can reach ClickHouse any more."""
        self._uvicorn.should_exit = True
        self._thread.join(15)
        self.server.monitor.stop()  # also when uvicorn's shutdown hooks did not run
        return not self._thread.is_alive()
