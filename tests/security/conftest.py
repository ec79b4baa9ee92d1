"""Attacks on the query surface that must fail, on both ClickHouse backends: chDB in this process,
and a ClickHouse server (`projector chdb-server`, or the one PROJECTOR_TEST_CLICKHOUSE_URL names).
No Kafka or Postgres is needed: what is attacked is the query module and the ClickHouse it asks.

Each backend holds what a deployment holds: a read model, a replica, and the projector's control
database with a secret in its dead-letter table (a token holder must not read it)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from projector.clickhouse import ChdbBackend, ServerBackend
from projector.config import ProjectorConfig
from tests.integration.projector_harness import CHDB_SERVER_PASSWORD, start_chdb_server

SECRET = "the-dead-letter-secret-4711"
CONFIG = ProjectorConfig()  # the default databases: read_models, replica_*, projector


def fill(backend: ChdbBackend | ServerBackend, prefix: str) -> None:
    for statement in (
        f"CREATE DATABASE IF NOT EXISTS {prefix}read_models",
        f"CREATE DATABASE IF NOT EXISTS {prefix}replica_public",
        f"CREATE DATABASE IF NOT EXISTS {prefix}projector",
        f"CREATE TABLE IF NOT EXISTS {prefix}read_models.orders_by_status (status String, "
        "orders UInt64) ENGINE = MergeTree ORDER BY status",
        f"INSERT INTO {prefix}read_models.orders_by_status VALUES ('NEW', 3), ('PAID', 5)",
        f"CREATE TABLE IF NOT EXISTS {prefix}replica_public.orders (id Int64, total Float64) "
        "ENGINE = MergeTree ORDER BY id",
        f"INSERT INTO {prefix}replica_public.orders VALUES (1, 9.5), (2, 20)",
        f"CREATE TABLE IF NOT EXISTS {prefix}projector.dlq (reason String) ENGINE = MergeTree "
        "ORDER BY reason",
        f"INSERT INTO {prefix}projector.dlq VALUES ('{SECRET}')",
    ):
        backend.execute(statement)


# chDB holds one engine per process: one per test module, closed at its end.
@pytest.fixture(scope="module")
def chdb_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(str(tmp_path_factory.mktemp("chdb")))
    fill(backend, "")
    yield backend
    backend.close()


@contextmanager
def own_chdb_server(directory: Path) -> Iterator[str]:
    """A `projector chdb-server` over `directory` while the block runs: its URL, without
    credentials (its password: CHDB_SERVER_PASSWORD)."""
    process, url = start_chdb_server(directory / "chdb-server")
    try:
        yield url.replace(f"default:{CHDB_SERVER_PASSWORD}@", "")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's ClickHouse server: the one PROJECTOR_TEST_CLICKHOUSE_URL names, else a
    chdb-server of this session."""
    url = os.environ.get("PROJECTOR_TEST_CLICKHOUSE_URL")
    if url:
        yield url
        return
    with own_chdb_server(tmp_path_factory.mktemp("server")) as started:
        yield started


@pytest.fixture(scope="session")
def server_backend(server: str) -> ServerBackend:
    backend = ServerBackend(server, "default", CHDB_SERVER_PASSWORD)
    fill(backend, "")
    return backend


@pytest.fixture(params=["chdb", "server"])
def engine(request: pytest.FixtureRequest) -> ChdbBackend | ServerBackend:
    """Each test once per backend."""
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


TOKEN = "attacker-holds-this-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def running_service(engine: ChdbBackend | ServerBackend, **settings: Any) -> Iterator[str]:
    """The real query service (uvicorn, FastAPI, the query module) over `engine` on a free port,
    with `settings` over the defaults; its URL while the block runs."""
    from projector.commit.checkpoint import PROJECTION
    from projector.commit.ledger import TransactionLedger
    from queries.server import BackgroundServer
    from tests.integration.projector_harness import free_port

    TransactionLedger(engine, "projector", PROJECTION).create()  # what read positions read
    port = free_port()
    config = ProjectorConfig(
        **{"api_token": TOKEN, "kafka_bootstrap": "127.0.0.1:9", "ops_sample_s": 60.0, **settings}
    )
    server = BackgroundServer(config, engine, "127.0.0.1", port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.stop()
