"""The query service under clients that would starve the others: bodies too large, too many
ad-hoc statements at once, a crowd waiting for a far-ahead `min_lsn` -- on both backends, with
the real service (uvicorn, FastAPI, the query module) on a port of its own. The checks look at
what each client is answered while the others still hold their requests: never at timings."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from projector.clickhouse import ChdbBackend, ServerBackend
from tests.security.conftest import AUTH, running_service

MAX_BODY = 64 * 1024
WAITERS = 2


@pytest.fixture
def service(engine: ChdbBackend | ServerBackend) -> Iterator[str]:
    with running_service(
        engine,
        query_max_body_bytes=MAX_BODY,
        sql_max_concurrent=1,
        query_max_waiters=WAITERS,
        query_wait_ms=8_000,
        sql_max_seconds=6.0,
    ) as url:
        yield url


def test_a_body_beyond_the_limit_is_refused_before_it_is_read(service: str) -> None:
    declared = httpx.post(
        f"{service}/sql", headers=AUTH, json={"sql": "SELECT 1 -- " + "x" * (2 * MAX_BODY)}
    )
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"sql": "SELECT 1 -- '
        for _ in range(64):
            yield b"x" * 4096
        yield b'"}'

    streamed = httpx.post(f"{service}/sql", headers=AUTH, content=chunks())
    assert streamed.status_code == 413, streamed.text
    fits = httpx.post(f"{service}/sql", headers=AUTH, json={"sql": "SELECT 1 AS one"})
    assert fits.status_code == 200, fits.text


def test_ad_hoc_statements_beyond_the_cap_get_429_at_once(service: str) -> None:
    """One slow statement holds the one slot; the next is told to come back (429, Retry-After)
    while the first still runs, and a named request is not refused meanwhile."""
    slow = (
        "SELECT count() AS n FROM numbers(10000000) AS a, numbers(1000) AS b "
        "WHERE cityHash64(a.number, b.number) = 1"
    )  # reads little, computes for seconds
    refused, first, runner = None, [], threading.Thread()
    for _attempt in range(5):  # the slow one may lose the race for the slot to a probe: again
        first.clear()
        runner = threading.Thread(
            target=lambda: first.append(
                httpx.post(f"{service}/sql", headers=AUTH, json={"sql": slow}, timeout=60)
            )
        )
        runner.start()
        # A head start: a probe sent with it takes the slot first as often as not (the slow one
        # is then the refused one, and the attempt is lost).
        time.sleep(0.3)
        while runner.is_alive() and refused is None:  # until the slow one holds its slot
            answer = httpx.post(
                f"{service}/sql", headers=AUTH, json={"sql": "SELECT 1 AS one"}, timeout=60
            )
            if answer.status_code == 429:
                refused = answer
                assert runner.is_alive()  # answered while the first still runs
        runner.join(60)
        if refused is not None:
            break
    assert refused is not None, f"a second statement never met the cap; the slow one: {first}"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"] == "busy"
    assert first and first[0].status_code in (200, 400), first[0].text  # done, or timed out


def test_waiters_beyond_the_cap_are_answered_at_once_and_health_never_waits(service: str) -> None:
    far = "FFFFFFFF/FFFFFFFF"  # an LSN no read model reaches
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def wait_for_far_lsn() -> None:
        answer = httpx.get(
            f"{service}/queries/order_by_id",
            headers=AUTH,
            timeout=60,
            params={"order_id": "1", "min_lsn": far, "wait_ms": "8000"},
        )
        with lock:
            answers.append(answer)

    crowd = [threading.Thread(target=wait_for_far_lsn) for _ in range(WAITERS + 6)]
    for thread in crowd:
        thread.start()
    # Those beyond the cap are answered (202) while the capped ones still wait ...
    for _ in range(400):
        with lock:
            if len(answers) >= 6:
                break
        threading.Event().wait(0.02)
    with lock:
        early = list(answers)
    assert len(early) >= 6, f"only {len(early)} answered while {WAITERS} may wait"
    assert all(a.status_code == 202 for a in early), [a.text for a in early]
    assert all("Retry-After" in a.headers for a in early)
    # ... and /health answers while they wait.
    assert httpx.get(f"{service}/health").status_code == 200
    assert sum(thread.is_alive() for thread in crowd) >= 1
    for thread in crowd:
        thread.join(60)
    assert len(answers) == WAITERS + 6 and all(a.status_code == 202 for a in answers)
