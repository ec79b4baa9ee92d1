"""No credential shows in what the projector writes or says (issue 10, item 10).

A registry URL may carry a user and password (`http://user:password@host/...`). The projector
uses it for its own registry client and gives it to ClickHouse for the fast path; neither its
log, nor a dead letter's reason, nor `status` / `dlq list`, nor the errors of an unreachable
registry may show the password. (The stack's Apicurio does not check credentials, so the URL
with them works as is.)
"""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess, free_port

PASSWORD = "pw-9f3Kq7zT"  # a test value, checked to be absent


def with_credentials(url: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=f"probe:{PASSWORD}@{host}"))


def test_a_registry_password_never_shows(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    projector.env["REGISTRY_URL"] = with_credentials(stack.env["REGISTRY_URL"])
    projector.env["PROJECTOR_TRANSACTION_METADATA"] = "true"
    table = projector.table("secret_rows")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, placed date)")
    stack.apply()
    with psycopg.connect(stack.admin_dsn) as conn:
        conn.execute(
            f"INSERT INTO {table} SELECT i, DATE '2024-01-01' + i FROM generate_series(1, 200) i"
        )
        conn.execute(f"INSERT INTO {table} VALUES (0, '2400-01-01')")  # beyond Date32: a letter
    projector.catch_up()
    rows = projector.sql(f"SELECT count() AS n FROM {projector.replica_db}.{table} FINAL")
    assert int(rows[0]["n"]) == 200  # the URL with credentials works
    said = [projector.log.read_text()]
    for command in (("dlq", "list", "--format", "json"), ("status", "--json")):
        result = projector.cli(*command)
        assert result.returncode == 0, result.stderr
        said += [result.stdout, result.stderr]
    assert f"cdc.public.{table}" in said[1], said[1]  # the dead letter is listed
    for text in said:
        assert PASSWORD not in text, text[-3000:]

    # An unreachable registry: the errors name the address, never the password.
    down = ProjectorProcess(stack, tmp_path / "down")
    (tmp_path / "down").mkdir()
    down.env["REGISTRY_URL"] = with_credentials(stack.env["REGISTRY_URL"], port=free_port())
    down.env["PROJECTOR_TABLE_PATTERN"] = f"({table})"
    process = down.start()
    try:
        down.wait_for_log("retrying with back-off")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    replay = projector.cli("dlq", "replay", env={"REGISTRY_URL": down.env["REGISTRY_URL"]})
    assert replay.returncode == 1 and "probe:***@127.0.0.1" in replay.stderr, replay.stderr
    # The address is named (redacted), so the error can be acted on.
    assert "probe:***@127.0.0.1" in down.log.read_text(), down.log.read_text()[-3000:]
    for text in (down.log.read_text(), replay.stdout, replay.stderr):
        assert PASSWORD not in text, text[-3000:]
