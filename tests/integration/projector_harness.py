"""Run the projector as a user would (a separate process) and compare ClickHouse with Postgres.

chDB allows one engine per process, and the projector owns its data directory while it runs, so
tests never open chDB themselves: they read ClickHouse through `projector sql`.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from projector.clickhouse import ParameterisedClickHouse, parse_rows
from projector.config import load_config, open_backend
from queries.adhoc import SqlLimits, run_read_only
from queries.errors import QueryError
from tests.integration.conftest import FENCE_TABLE, PROJECTOR, StackHandle

# The connector's login variables: the projector derives its `source_dsn` from them.
CONNECTOR_LOGIN = ("PG_HOST", "PG_PORT", "PG_DATABASE", "CDC_USER", "CDC_PASSWORD")
# `projector sql`'s own defaults (--max-rows, --max-seconds).
# The password of the test session's `projector chdb-server`s (each needs one): every deployment
# sends it (the server backend's PROJECTOR_CLICKHOUSE_PASSWORD; chDB ignores it), and
# `start_chdb_server` puts it in the URL it returns, for the tests' own HTTP requests.
CHDB_SERVER_PASSWORD = os.environ.get("PROJECTOR_TEST_CLICKHOUSE_PASSWORD") or secrets.token_hex(16)
# What `projector sql` takes by default (the operator's command).
SQL_LIMITS = SqlLimits(max_rows=1_000_000, max_seconds=300.0, max_result_bytes=1024**3)


class ProjectorProcess:
    """One projector deployment of a test: its own consumer group and its own ClickHouse state
    (a chDB directory, or uniquely prefixed databases on a ClickHouse server)."""

    def __init__(self, stack: StackHandle, workdir: Path, server_url: str | None = None) -> None:
        self.stack = stack
        self.unique = unique = uuid.uuid4().hex[:8]
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP": stack.env["KAFKA_BOOTSTRAP"],
            "REGISTRY_URL": stack.env["REGISTRY_URL"],
            "PROJECTOR_GROUP_ID": f"test-{unique}",
            # The broker's minimum: a killed run's partitions move to the next run after 6 s.
            "PROJECTOR_SESSION_TIMEOUT_MS": "6000",
            "PROJECTOR_MAX_BATCH_MESSAGES": "500",
            # Only this test's tables (named by `table()`) and the fence: every test's projector
            # would otherwise re-apply every earlier test's topics.
            "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|.*_{unique})",
            # The transaction topic holds every test's transactions; tests of watermarks
            # switch it back on.
            "PROJECTOR_TRANSACTION_METADATA": "false",
            # ... and then their deployment reads that history from offset 0: in batches of
            # 500, hundreds of them by the suite's end (each its checkpoint records and fence
            # checks), half a minute or more per deployment on 2 cores. The table batches above
            # stay small.
            "PROJECTOR_TRANSACTION_BATCH_MESSAGES": "50000",
            "PROJECTOR_METRICS_PORT": "0",  # many projectors at once; the metrics test sets one
            "PROJECTOR_CLICKHOUSE_PASSWORD": CHDB_SERVER_PASSWORD,
            # The connector's login, as a deployment has it: the projector's `source_dsn` (the
            # WAL position, and re-reads of a table through the signal table).
            **{v: stack.env[v] for v in CONNECTOR_LOGIN},
        }
        self.server_url = server_url
        if (
            server_url is None
        ):  # the defaults (replica_<schema>, projector, read_models) in a chDB dir
            self.env["PROJECTOR_CHDB_PATH"] = str(workdir / "chdb")
            self.replica_db, self.control_db = "replica_public", "projector"
            self.read_model_db = "read_models"
        else:  # one server for many deployments: databases of their own
            self.replica_db, self.control_db = f"t{unique}_replica_public", f"t{unique}_projector"
            self.read_model_db = f"t{unique}_read_models"
            self.env |= {
                "PROJECTOR_BACKEND": "server",
                "PROJECTOR_CLICKHOUSE_URL": server_url,
                "PROJECTOR_REPLICA_PREFIX": f"t{unique}_replica_",
                "PROJECTOR_CONTROL_DATABASE": self.control_db,
                "PROJECTOR_READ_MODEL_DATABASE": self.read_model_db,
            }
        self.log = workdir / "projector.log"
        self._fence_table_seen = False
        self._servers: dict[tuple[str, ...], ParameterisedClickHouse] = {}

    def table(self, prefix: str) -> str:
        """A table name this projector projects (and no other test's projector does)."""
        return f"{prefix}_{self.unique}"

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`projector run` in the background as this deployment (its environment, overlaid by
        `env`), logging to `log`."""
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [PROJECTOR, "run"],
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start_in_a_group_of_its_own(self, run: int) -> tuple[subprocess.Popen[bytes], int]:
        """`projector run` in a consumer group of its own (the deployment's group with `-run`
        appended), and where its log began: a run started to be SIGKILLed and replaced.

        In the deployment's group, a run started after a SIGKILL gets no partition until the
        broker ends the killed run's session (6 s, the broker's minimum): seconds of nothing per
        kill. A group of its own gives them at once, and the run resumes just as it would in the
        deployment's group: positions come from the checkpoints in ClickHouse, never from the
        group's committed offsets (projector/commit/checkpoint.py, step B), and each run claims its
        partitions one generation above the killed run's claim either way (step A)."""
        since = len(self.log.read_bytes()) if self.log.exists() else 0
        group = f"{self.env['PROJECTOR_GROUP_ID']}-run{run}"
        return self.start(env={"PROJECTOR_GROUP_ID": group}), since

    def wait_until_assigned(self, process: subprocess.Popen[bytes], since: int) -> None:
        """Wait until the run started when the log was `since` bytes long holds its partitions
        (it logs "assigned" per partition once it claimed it and read its checkpoint)."""
        deadline = time.monotonic() + 120
        while b"assigned" not in self.log.read_bytes()[since:]:
            running = process.poll() is None
            assert running and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.05)

    def catch_up(self, timeout_s: float = 240) -> None:
        """Apply everything committed in Postgres so far: `run --until-kafka-end` until a fence
        row committed now is in ClickHouse (Kafka may not hold the latest changes yet). Not
        `--until-caught-up`, which does this in one run but follows the transaction topic: the
        harness leaves that off (it holds every test's transactions)."""
        deadline = time.monotonic() + timeout_s
        try:
            # Wait until Debezium has put the fence on Kafka: then every change before it is
            # there too, and so is every topic it went to. A run that starts after this lists
            # them all; a run that started before may have applied the fence but not a topic
            # created while it ran (a stalled connector catching up), and the fence would lie.
            fence = self.stack.fence_in_kafka(timeout_s=min(120.0, timeout_s / 2))
        except Exception:  # the connector stopped on purpose, the topic not there yet: later
            fence = self.stack.fence()
        while True:
            with self.log.open("ab") as out:
                done = subprocess.run(
                    [PROJECTOR, "run", "--until-kafka-end"],
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            assert done.returncode == 0, self.log.read_text()[-3000:]
            if self.fence_applied(fence):
                return
            assert time.monotonic() < deadline, (
                f"fence {fence} not applied in {timeout_s}s; {self.stack.connector_health()}"
            )
            time.sleep(0.5)

    def reset_table(
        self,
        table: str,
        settled: Callable[[], None],
        then: Callable[[], None] = lambda: None,
        timeout_s: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        """`projector table reset TABLE` (Debezium re-snapshots it), `then`, and catch up until
        `settled` stops raising AssertionError: the snapshot arrives in chunks, after the reset."""
        reset = self.cli("table", "reset", table, env={"ADMIN_DSN": self.stack.admin_dsn})
        assert reset.returncode == 0, reset.stderr
        then()
        deadline = time.monotonic() + timeout_s
        while True:
            self.catch_up()
            try:
                settled()
                return reset
            except AssertionError:
                assert time.monotonic() < deadline, f"{table} never settled after its reset"
                time.sleep(2)

    def wait_for_log(self, text: str, timeout_s: float = 120) -> None:
        """Wait until a running projector has logged `text`."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log.read_text():
            assert time.monotonic() < deadline, (
                f"{text!r} not logged: {self.log.read_text()[-3000:]}"
            )
            time.sleep(0.5)

    def fence_applied(self, fence: int) -> bool:
        # One query once the fence's replica table is known to exist (each `projector sql` on
        # chDB is a process start, seconds on a busy machine); asked again when it is gone.
        newest = f"SELECT max(id) AS id FROM {self.replica_db}.{FENCE_TABLE} FINAL"
        if self._fence_table_seen:
            try:
                return int(self.sql(newest)[0]["id"] or 0) >= fence
            except AssertionError:  # dropped meanwhile (a test may reset the replicas)
                self._fence_table_seen = False
        exists = self.sql(
            "SELECT count() AS n FROM system.tables "
            f"WHERE database = '{self.replica_db}' AND name = '{FENCE_TABLE}'"
        )
        if not int(exists[0]["n"]):
            return False
        self._fence_table_seen = True
        return int(self.sql(newest)[0]["id"] or 0) >= fence

    def cli(
        self, *args: str, timeout_s: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`projector ARGS` as this deployment (its environment, overlaid by `env`)."""
        return subprocess.run(
            [PROJECTOR, *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def sql(self, query: str) -> list[dict[str, Any]]:
        """`projector sql --format json QUERY`. On a server, the same checked read-only SELECT
        (`run_read_only`, what the command runs) is sent from this process: no chDB directory to
        own there, and a process start per read costs seconds of suite time."""
        if self.server_url is not None:
            config = load_config(env=self.env)  # as the command reads it, now
            login = (config.clickhouse_url, config.clickhouse_user, config.clickhouse_password)
            if login not in self._servers:
                self._servers[login] = open_backend(config)
            try:
                lines = run_read_only(self._servers[login], query, SQL_LIMITS)
            except QueryError as exc:
                raise AssertionError(exc.message) from exc
            return parse_rows("\n".join(lines))
        result = self.cli("sql", "--format", "json", query)
        assert result.returncode == 0, result.stderr
        return parse_rows(result.stdout)  # decimals stay exact


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_chdb_server(path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`projector chdb-server` on a free port over the chDB directory `path` (its log beside
    it), once it answers; the process and its URL."""
    port = free_port()
    log = (path.parent / f"{path.name}.log").open("wb")
    process = subprocess.Popen(
        [PROJECTOR, "chdb-server", "--port", str(port), "--path", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PROJECTOR_CLICKHOUSE_PASSWORD": CHDB_SERVER_PASSWORD},
    )
    url = f"http://default:{CHDB_SERVER_PASSWORD}@127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "chdb-server did not start"
        time.sleep(0.3)


def normalise(value: Any) -> Any:
    """One comparable form for a value read from Postgres (psycopg) or ClickHouse (JSON text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, int | float | Decimal):
        return Decimal(str(value)).normalize()
    if isinstance(value, str):
        if value in ("true", "false"):
            return value == "true"
        if value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return value.lower().replace("infinity", "inf")
        try:
            return Decimal(value).normalize()
        except ArithmeticError:  # not a number (e.g. hex text like "8626e14"), or out of range
            return value
    return str(value)


def assert_replica_equals_source(
    stack: StackHandle,
    projector: ProjectorProcess,
    table: str,
    key: list[str],
    append_only: bool = False,
    render: dict[str, tuple[str, str]] | None = None,
) -> int:
    """Every row and column of `public.table` equals its replica table `FINAL` (a plain read
    for an append-only table: there is no FINAL on MergeTree). Returns the row count.

    `render` maps a column to a (Postgres, ClickHouse) pair of expressions (`{}` = the column)
    giving the same text on both sides, for types whose Python values differ in spelling."""
    render = render or {}
    columns = [
        r[0]
        for r in stack.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND table_name = %s ORDER BY ordinal_position",
            [table],
        )
    ]
    order = ", ".join(key)
    pg_select = ", ".join(render[c][0].format(c) if c in render else c for c in columns)
    ch_select = ", ".join(f"{render[c][1].format(c)} AS {c}" if c in render else c for c in columns)
    source = stack.sql(f"SELECT {pg_select} FROM public.{table} ORDER BY {order}")
    replica = projector.sql(
        f"SELECT {ch_select} FROM {projector.replica_db}.{table}{'' if append_only else ' FINAL'} "
        f"ORDER BY {order}"
    )
    source_rows = [tuple(normalise(v) for v in row) for row in source]
    replica_rows = [tuple(normalise(row[c]) for c in columns) for row in replica]
    assert len(replica_rows) == len(source_rows), (
        f"{table}: {len(replica_rows)} rows in ClickHouse, {len(source_rows)} in Postgres"
    )
    for expected, actual in zip(source_rows, replica_rows, strict=True):
        assert actual == expected, f"{table}: ClickHouse {actual} != Postgres {expected}"
    return len(source_rows)
