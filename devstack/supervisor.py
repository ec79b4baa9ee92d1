"""Start, watch and stop the stack's processes.

The supervisor is deliberately dumb: every component runs in the foreground of its own session
(process group), its output goes to `.stack/logs/<name>.log`, its pid to `.stack/run/<name>.pid`.
`up` is idempotent: a component whose recorded process is alive and healthy is left alone.
`down` sends SIGTERM to the whole process group, waits, then SIGKILLs what is left, so no
process survives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from devstack.artifacts import fetch_all
from devstack.chdb_server import stack_password
from devstack.components import (
    Component,
    Kafka,
    KafkaConnect,
    Postgres,
    SchemaRegistry,
    port_open,
)
from devstack.errors import ComponentFailed
from devstack.secret_files import write_secret_file
from devstack.settings import StackSettings
from projector.config import STACK_ENV_FILE

Log = Callable[[str], None]


@dataclass
class ComponentStatus:
    name: str
    state: str  # "healthy" | "unhealthy" | "stopped"
    pid: int | None
    detail: str
    endpoint: dict[str, str]


class Stack:
    """The local stack as a whole, in start order (stop order is the reverse)."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        from devstack.artifacts import artifact_paths

        self.settings = settings or StackSettings()
        artifacts = artifact_paths(self.settings)
        self.postgres = Postgres(self.settings, artifacts)
        self.kafka = Kafka(self.settings, artifacts)
        self.registry = SchemaRegistry(self.settings, artifacts, self.postgres)
        self.connect = KafkaConnect(self.settings, artifacts, self.kafka)
        # Components in one inner list start together; lists start one after the other.
        self.waves: list[list[Component]] = [
            [self.postgres],
            [self.kafka, self.registry],
            [self.connect],
        ]

    @property
    def components(self) -> list[Component]:
        return [c for wave in self.waves for c in wave]

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        names = ", ".join(c.name for c in self.components)
        raise KeyError(f"no component named {name!r} (choose one of: {names})")

    # ---- paths -------------------------------------------------------------------------------

    def log_file(self, component: Component) -> Path:
        return self.settings.logs_dir / f"{component.name}.log"

    def pid_file(self, component: Component) -> Path:
        return self.settings.run_dir / f"{component.name}.pid"

    # ---- process bookkeeping -----------------------------------------------------------------

    def pid_of(self, component: Component) -> int | None:
        """The recorded pid, if that process is still alive and is ours."""
        try:
            pid = int(self.pid_file(component).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        # Guard against pid reuse: our processes carry a path under the state or cache dir.
        markers = (str(self.settings.state_dir), str(self.settings.cache_dir))
        if not any(m.encode() in cmdline for m in markers):
            return None
        return pid

    def tail(self, component: Component, lines: int = 20) -> str:
        try:
            with self.log_file(component).open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- up ----------------------------------------------------------------------------------

    def up(self, log: Log = print) -> list[ComponentStatus]:
        fetch_all(self.settings, log=log)
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        for wave in self.waves:
            with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                # list() re-raises the first failure of the wave.
                list(pool.map(lambda c: self._ensure_running(c, log), wave))
        self.write_client_environment()
        return self.status()

    def write_client_environment(self) -> Path:
        """`client.env` in the state dir: the addresses every `projector` command reads by the
        rule of `projector.config.client_environment`. It holds passwords: created 0600."""
        path = self.settings.state_dir / STACK_ENV_FILE
        text = "".join(f"{name}={value}\n" for name, value in self.client_environment().items())
        write_secret_file(path, text)
        return path

    def _ensure_running(self, component: Component, log: Log) -> None:
        pid = self.pid_of(component)
        if pid is not None and component.problem() is None:
            log(f"{component.name}: already running (pid {pid})")
            component.after_healthy()
            return
        if pid is None and component.port and port_open(self.settings.host, component.port):
            raise ComponentFailed(
                component.name,
                f"port {component.port} on {self.settings.host} is in use by another process; "
                f"stop it or set PROJECTOR_{component.name.upper()}_PORT",
                self.tail(component),
            )
        if pid is None:
            component.prepare()
            pid = self._spawn(component)
            log(f"{component.name}: started (pid {pid}), waiting until healthy ...")
        self._wait_healthy(component, pid)
        component.after_healthy()
        log(f"{component.name}: healthy")

    def _spawn(self, component: Component) -> int:
        log_path = self.log_file(component)
        with log_path.open("ab") as out:
            out.write(f"\n===== starting {component.name} at {time.ctime()} =====\n".encode())
            out.flush()
            proc = subprocess.Popen(
                component.command(),
                cwd=component.home,
                env={**os.environ, **component.environment()},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=component.run_as,
            )
        self.pid_file(component).write_text(f"{proc.pid}\n")
        return proc.pid

    def _wait_healthy(self, component: Component, pid: int) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        reason: str | None = "not checked yet"
        while time.monotonic() < deadline:
            if not process_running(pid):
                raise ComponentFailed(component.name, "the process exited", self.tail(component))
            reason = component.problem()
            if reason is None:
                return
            time.sleep(0.5)
        raise ComponentFailed(
            component.name,
            f"not healthy after {self.settings.startup_timeout_s:.0f}s: {reason}",
            self.tail(component),
        )

    # ---- down --------------------------------------------------------------------------------

    def down(self, log: Log = print, timeout_s: float = 60.0) -> None:
        for component in reversed(self.components):
            pid = self.pid_of(component)
            if pid is None:
                self.pid_file(component).unlink(missing_ok=True)
                continue
            log(f"{component.name}: stopping (pid {pid}) ...")
            _signal_group(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout_s):
                log(f"{component.name}: did not stop in {timeout_s:.0f}s, killing")
                _signal_group(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
            self.pid_file(component).unlink(missing_ok=True)
            log(f"{component.name}: stopped")

    # ---- addresses for clients ---------------------------------------------------------------

    def client_environment(self) -> dict[str, str]:
        """The variables the connector files and the projector read, pointing at this stack."""
        s = self.settings
        return {
            "PG_HOST": s.host,
            "PG_PORT": str(s.postgres_port),
            "PG_DATABASE": s.app_database,
            "CDC_USER": s.cdc_user,
            "CDC_PASSWORD": self.postgres.cdc_password(),
            "ADMIN_DSN": self.postgres.admin_dsn(),
            "KAFKA_BOOTSTRAP": self.kafka.bootstrap(),
            "REGISTRY_URL": self.registry.url(),
            "CONNECT_URL": self.connect.url(),
            # `projector chdb-server`'s password, which projectors on it send as any ClickHouse
            # password (a ClickHouse server of your own: set PROJECTOR_CLICKHOUSE_PASSWORD).
            "PROJECTOR_CLICKHOUSE_PASSWORD": stack_password(s.state_dir),
        }

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> list[ComponentStatus]:
        result = []
        for component in self.components:
            pid = self.pid_of(component)
            if pid is None:
                state, detail = "stopped", "not running"
            else:
                problem = component.problem()
                state, detail = ("healthy", "ok") if problem is None else ("unhealthy", problem)
            try:
                endpoint = component.endpoint()
            except FileNotFoundError:
                endpoint = {}
            result.append(ComponentStatus(component.name, state, pid, detail, endpoint))
        return result


def process_running(pid: int) -> bool:
    """Is `pid` a live process? A zombie counts as gone: it holds no port or file."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_running(pid) and not _group_alive(pid):
            return True
        time.sleep(0.2)
    return False


def _group_alive(pgid: int) -> bool:
    """Is any process of the group still running? Zombies do not count: they hold no port or
    file, and only their parent (perhaps another process that started the stack) can reap them."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def healthy(statuses: Iterable[ComponentStatus]) -> bool:
    return all(s.state == "healthy" for s in statuses)
