"""A small client for the Kafka Connect REST API (the calls `projector connectors` needs)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from connectors.errors import ConnectRequestFailed, ConnectUnavailable

REBALANCE_WAIT_S = 60.0


class ConnectClient:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        """One REST call; asked again for up to REBALANCE_WAIT_S while Connect's workers
        rebalance (they answer 409, or 500 "a rebalance is expected", meanwhile: after every
        config change, for instance)."""
        deadline = time.monotonic() + REBALANCE_WAIT_S
        while True:
            try:
                response = self._http.request(method, path, json=json)
            except httpx.HTTPError as exc:
                raise ConnectUnavailable(
                    f"Kafka Connect at {self.url} is not reachable ({type(exc).__name__}); "
                    "is the stack up? (projector stack up)"
                ) from exc
            if response.status_code < 400:
                return response.json() if response.content else None
            failed = ConnectRequestFailed(method, path, response.status_code, response.text)
            if not _rebalancing(failed) or time.monotonic() > deadline:
                raise failed
            time.sleep(0.5)

    def connectors(self) -> list[str]:
        return list(self._request("GET", "/connectors"))

    def config(self, name: str) -> dict[str, str] | None:
        try:
            return dict(self._request("GET", f"/connectors/{name}/config"))
        except ConnectRequestFailed as exc:
            if exc.status == 404:
                return None
            raise

    def put_config(self, name: str, config: dict[str, str]) -> bool:
        """Create or update; returns True when something changed (PUT is idempotent)."""
        current = self.config(name)
        desired = {**config, "name": name}
        if current == desired:
            return False
        self._request("PUT", f"/connectors/{name}/config", json=config)
        return True

    def status(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/connectors/{name}/status"))

    def pause(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/pause")

    def resume(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/resume")

    def restart(self, name: str) -> None:
        self._request("POST", f"/connectors/{name}/restart?includeTasks=true&onlyFailed=false")

    def restart_failed(self, name: str) -> str | None:
        """Restart the connector's failed parts (connector and tasks), if any; what failed and
        why (`failure_summary`), None when nothing had failed. A restarted task resumes from its
        last flushed offset: nothing is lost, a window may be sent again (at-least-once)."""
        last = self.status(name)
        failed = [last["connector"]] * (last["connector"]["state"] == "FAILED") + [
            t for t in last.get("tasks", []) if t["state"] == "FAILED"
        ]
        if not failed:
            return None
        self._request("POST", f"/connectors/{name}/restart?includeTasks=true&onlyFailed=true")
        deadline = time.monotonic() + 30  # until the restart shows (RESTARTING, then RUNNING)
        while time.monotonic() < deadline and "FAILED" in _states(self.status(name)):
            time.sleep(0.3)
        return failure_summary(next((f["trace"] for f in failed if f.get("trace")), ""))

    def stop(self, name: str) -> None:
        """Stop connector and tasks (state STOPPED; `resume` starts them again)."""
        self._request("PUT", f"/connectors/{name}/stop")

    def wait_state(self, name: str, state: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.status(name)["connector"]["state"] == state:
                return
            time.sleep(0.3)
        raise ConnectRequestFailed(
            "GET",
            f"/connectors/{name}/status",
            200,
            f"connector did not reach {state} in {timeout_s:.0f}s",
        )

    def bounce(self, name: str) -> None:
        """Stop, wait for STOPPED, resume, wait for RUNNING: a restart without a race, because
        the RUNNING we wait for cannot be the state from before the stop."""
        self.stop(name)
        self.wait_state(name, "STOPPED")
        self.resume(name)
        self.wait_running(name)

    def wait_tasks_configured(
        self,
        name: str,
        config: Mapping[str, str],
        removed: Iterable[str] = (),
        timeout_s: float = 60.0,
    ) -> None:
        """Wait until every task's stored config carries `config` and none of the `removed` keys
        (Connect writes a changed config's task configs asynchronously after the PUT; until then
        a task may still run, and stream, with the old one). Values a config provider fills in
        (`${...}`) are not compared: Connect may store them either way."""
        wanted = {k: v for k, v in config.items() if "${" not in v}
        gone = list(removed)

        def configured(task: Mapping[str, Any]) -> bool:
            stored = task.get("config", {})
            return all(stored.get(k) == v for k, v in wanted.items()) and not any(
                k in stored for k in gone
            )

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tasks = self._request("GET", f"/connectors/{name}/tasks") or []
            if tasks and all(configured(task) for task in tasks):
                return
            time.sleep(0.3)
        raise ConnectRequestFailed(
            "GET",
            f"/connectors/{name}/tasks",
            200,
            f"the tasks did not take the new config in {timeout_s:.0f}s",
        )

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/connectors/{name}")

    def wait_running(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until the connector and all its tasks are RUNNING; raise with the trace if FAILED."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status(name)
            except ConnectRequestFailed as exc:
                if exc.status != 404:
                    raise
                time.sleep(0.5)
                continue
            states = [last["connector"]["state"]] + [t["state"] for t in last.get("tasks", [])]
            if "FAILED" in states:
                traces = [t.get("trace", "") for t in last.get("tasks", []) if t.get("trace")]
                trace = last["connector"].get("trace") or (traces[0] if traces else "")
                raise ConnectRequestFailed(
                    "GET",
                    f"/connectors/{name}/status",
                    200,
                    f"connector FAILED:\n{failure_summary(trace)}",
                )
            if last.get("tasks") and all(s == "RUNNING" for s in states):
                return last
            time.sleep(0.5)
        raise ConnectRequestFailed(
            "GET", f"/connectors/{name}/status", 200, f"not RUNNING after {timeout_s:.0f}s: {last}"
        )


def _rebalancing(exc: ConnectRequestFailed) -> bool:
    """Connect answers 409, or 500 "a rebalance is expected", while its workers rebalance."""
    return exc.status == 409 or (exc.status == 500 and "rebalance" in str(exc).lower())


def _states(status: dict[str, Any]) -> list[str]:
    return [status["connector"]["state"]] + [t["state"] for t in status.get("tasks", [])]


def failure_summary(trace: str) -> str:
    """A Java trace as a person reads it: its first line and every `Caused by:` line, where the
    reason is (the frames between them say only where). Kafka Connect's status holds the whole
    trace; its first line alone ("Tolerance exceeded in error handler") never says why."""
    lines = trace.strip().splitlines()
    kept = lines[:1] + [
        line.strip() for line in lines[1:] if line.lstrip().startswith("Caused by:")
    ]
    return "\n".join(kept)
