"""`projector chdb-server` left running on a developer's machine, attacked from a web page and
from anything else on the machine: nothing runs without the password, nothing runs for a page
(an Origin) or for a host name that is not loopback (DNS rebinding); and what a client sends as
form fields (long query parameters) is bound as ClickHouse binds it."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from projector.clickhouse import ServerBackend
from queries.adhoc import canonical_statement
from tests.integration.projector_harness import CHDB_SERVER_PASSWORD
from tests.security.conftest import own_chdb_server


@pytest.fixture(scope="module")
def chdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own chdb-server (whatever server the rest of the suite uses)."""
    with own_chdb_server(tmp_path_factory.mktemp("attacked")) as url:
        yield url


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"default:{password}".encode()).decode()}


def write_file_statement(target: Path) -> str:
    return f"INSERT INTO FUNCTION file('{target}', 'LineAsString', 'l String') VALUES ('pwned')"


def test_nothing_runs_without_the_password(chdb_server: str, tmp_path: Path) -> None:
    target = tmp_path / "no-password"
    for headers in ({}, basic("wrong"), {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "x"}):
        answer = httpx.post(chdb_server, content=write_file_statement(target), headers=headers)
        assert answer.status_code == 401, answer.text
        assert "Authentication failed" in answer.text
    answer = httpx.post(chdb_server, params={"query": "SELECT 1", "password": "wrong"})
    assert answer.status_code == 401
    assert not target.exists()
    assert httpx.get(f"{chdb_server}/ping").status_code == 200  # liveness stays open


def test_a_web_page_cannot_run_a_statement(chdb_server: str, tmp_path: Path) -> None:
    """What `fetch(url, {method: 'POST', mode: 'no-cors', body})` from any page sends: a
    text/plain body with the page's Origin -- refused even were the password guessed."""
    target = tmp_path / "from-a-page"
    answer = httpx.post(
        chdb_server,
        content=write_file_statement(target),
        headers={
            "Origin": "http://evil.example",
            "Content-Type": "text/plain",
            **basic(CHDB_SERVER_PASSWORD),
        },
    )
    assert answer.status_code == 403, answer.text
    form = httpx.post(
        chdb_server,
        data={"query": write_file_statement(target)},
        headers=basic(CHDB_SERVER_PASSWORD),
    )
    assert form.status_code == 415, form.text
    assert not target.exists()


def test_a_rebound_host_name_is_refused(chdb_server: str, tmp_path: Path) -> None:
    """DNS rebinding: a page's own name, resolved to 127.0.0.1, reaches the port; its requests
    carry that name as Host."""
    target = tmp_path / "rebound"
    port = chdb_server.rsplit(":", 1)[1]
    answer = httpx.post(
        chdb_server,
        content=write_file_statement(target),
        headers={"Host": f"evil.example:{port}", **basic(CHDB_SERVER_PASSWORD)},
    )
    assert answer.status_code == 403, answer.text
    assert not target.exists()


def test_the_password_opens_it_the_ways_clients_send_it(chdb_server: str) -> None:
    ways: list[dict[str, object]] = [
        {"headers": basic(CHDB_SERVER_PASSWORD)},
        {"headers": {"X-ClickHouse-User": "default", "X-ClickHouse-Key": CHDB_SERVER_PASSWORD}},
        {"params": {"user": "default", "password": CHDB_SERVER_PASSWORD}},
    ]
    for way in ways:
        answer = httpx.post(chdb_server, content="SELECT 40 + 2", **way)  # type: ignore[arg-type]
        assert answer.status_code == 200 and answer.text.strip() == "42", (way, answer.text)


def test_a_long_statement_travels_as_a_form_field(chdb_server: str) -> None:
    """clickhouse-connect sends long query parameters as form fields; they were dropped, and
    statements of ~30,000 characters failed ("Substitution 'statement' is not set")."""
    backend = ServerBackend(chdb_server, "default", CHDB_SERVER_PASSWORD)
    statement = "SELECT '" + "x" * 80_000 + "' AS long"
    assert canonical_statement(backend, statement) == statement
    backend.close()


def test_external_data_that_fails_to_load_leaves_nothing_behind(chdb_server: str) -> None:
    """A client killed mid-upload sends a cut body: its external table fails to load. It was
    left in the one session, and every later request naming that table failed ("Temporary
    table ... already exists") -- the fast path's every batch, on every projector sharing it."""
    asked = {"query": "SELECT sum(x) FROM t", "t_structure": "x UInt8", "t_format": "CSV"}
    cut = httpx.post(
        chdb_server,
        params=asked,
        headers=basic(CHDB_SERVER_PASSWORD),
        files={"t": ("t", b"1\n2\nnot a number")},
    )
    assert cut.status_code == 500, cut.text
    whole = httpx.post(
        chdb_server,
        params=asked,
        headers=basic(CHDB_SERVER_PASSWORD),
        files={"t": ("t", b"1\n2\n")},
    )
    assert whole.status_code == 200 and whole.text.strip() == "3", whole.text
