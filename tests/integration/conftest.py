"""One real stack per test run, started by the project's own code and stopped if we started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from connectors import ConnectClient, apply_connector
from devstack import Stack, healthy
from tests.integration.change_events import EventDecoder

PROJECTOR = str(Path(sys.executable).parent / "projector")
FENCE_TABLE = "it_fence"


@dataclass(frozen=True)
class StackHandle:
    stack: Stack
    env: dict[str, str]

    @property
    def admin_dsn(self) -> str:
        return self.env["ADMIN_DSN"]

    @property
    def connect(self) -> ConnectClient:
        return ConnectClient(self.env["CONNECT_URL"])

    def sql(self, statement: str, params: object = None) -> list[tuple]:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            cur = conn.execute(statement, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def apply(self, capture: str | None = None) -> None:
        """Apply the connector, capturing `capture` (default: schema public) from now on."""
        env = self.env if capture is None else {**self.env, "CAPTURE": capture}
        apply_connector(self.connect, self.admin_dsn, env)

    def connector_health(self) -> str:
        """The connector's state for a failure message: why nothing arrives may be there."""
        from projector.operations.status import connector_state

        try:
            return str(connector_state(self.env))
        except Exception as exc:
            return f"connector state unreadable: {exc}"

    def fence(self) -> int:
        """Commit a row to the fence table: once it is in ClickHouse, so is every change
        committed before it (Debezium's one task emits in commit order)."""
        ((fence_id,),) = self.sql(f"INSERT INTO {FENCE_TABLE} DEFAULT VALUES RETURNING id")
        return int(fence_id)

    def fence_in_kafka(self, timeout_s: float = 60) -> int:
        """Commit a fence row and wait until its event is on Kafka: by then Debezium has handed
        every change committed before it to its producer (one task, commit order)."""
        topic = f"cdc.public.{FENCE_TABLE}"
        before = self.end_offset(topic)
        fence = self.fence()
        deadline = time.monotonic() + timeout_s
        while self.end_offset(topic) <= before:
            assert time.monotonic() < deadline, f"fence {fence} not on {topic} in {timeout_s}s"
            time.sleep(0.05)
        return fence

    def end_offset(self, topic: str, partition: int = 0) -> int:
        """The offset the next message of `topic[partition]` will get."""
        consumer = Consumer({"bootstrap.servers": self.env["KAFKA_BOOTSTRAP"], "group.id": "probe"})
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        consumer.close()
        return int(end)

    def messages_to_end(
        self, topic: str, partition: int = 0, timeout_s: float = 60
    ) -> list[Message]:
        """Every message of `topic[partition]` from offset 0 up to its end offset now."""
        end = self.end_offset(topic, partition)
        consumer = Consumer(
            {
                "bootstrap.servers": self.env["KAFKA_BOOTSTRAP"],
                "group.id": f"reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
            }
        )
        consumer.assign([TopicPartition(topic, partition, 0)])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while (not messages or (messages[-1].offset() or 0) < end - 1) and end > 0:
            assert time.monotonic() < deadline, f"{topic} not read to offset {end - 1} in time"
            msg = consumer.poll(1)
            if msg is not None and not msg.error():
                messages.append(msg)
        consumer.close()
        return messages

    def decoder(self) -> EventDecoder:
        return EventDecoder(self.env["REGISTRY_URL"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack() -> Iterator[StackHandle]:
    the_stack = Stack()
    was_running = healthy(the_stack.status())
    # Through the command line, as a user would; the services then are not children of pytest.
    up = subprocess.run([PROJECTOR, "stack", "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"projector stack up failed:\n{up.stderr}\n{up.stdout}"
    assert healthy(the_stack.status())
    handle = StackHandle(the_stack, {**the_stack.client_environment(), "CAPTURE": "public"})
    handle.sql(f"CREATE TABLE IF NOT EXISTS {FENCE_TABLE} (id bigserial PRIMARY KEY)")
    handle.apply()
    yield handle
    if not was_running and not os.environ.get("PROJECTOR_KEEP_STACK"):
        subprocess.run([PROJECTOR, "stack", "down"], timeout=300)


SERVER_URL_VARIABLE = "PROJECTOR_TEST_CLICKHOUSE_URL"


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the ClickHouse server the server-backend runs use: the one
    PROJECTOR_TEST_CLICKHOUSE_URL names, else a `projector chdb-server` (chDB served over
    ClickHouse's HTTP interface; no server can be installed here) started for this session, on a
    free port, and stopped at its end. Each deployment gets databases of its own on it."""
    url = os.environ.get(SERVER_URL_VARIABLE)
    if url:
        yield url
        return
    from tests.integration.projector_harness import start_chdb_server

    process, url = start_chdb_server(tmp_path_factory.mktemp("clickhouse") / "chdb-server")
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


@pytest.fixture(params=["chdb", "server"])
def server_url(request: pytest.FixtureRequest) -> str | None:
    """Once per ClickHouse backend: None for embedded chDB, the server's URL for the server
    backend (the session's `clickhouse_server`, started only when a server run needs it)."""
    if request.param == "chdb":
        return None
    return str(request.getfixturevalue("clickhouse_server"))


def one_backend(name: str) -> pytest.MarkDecorator:
    """Run a `projector` test on one ClickHouse backend ("chdb" or "server") only: for tests whose
    subject does not depend on the backend (the same statements either way), where a second run
    would cost suite time and find nothing new. Backend-specific paths (the fast path's files vs
    external data, the crash and replica semantics, type conversion) keep running on both."""
    return pytest.mark.parametrize("server_url", [name], indirect=True)


@pytest.fixture
def projector(stack: StackHandle, tmp_path: Path, server_url: str | None) -> object:
    """The projector under test, once per ClickHouse backend."""
    from tests.integration.projector_harness import ProjectorProcess

    return ProjectorProcess(stack, tmp_path, server_url=server_url)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed at its end if a failed assertion left them running."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(30)
