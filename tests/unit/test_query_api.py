"""The query service's HTTP API over a fake ClickHouse: auth, errors as 4xx JSON, read-your-writes
(202 and waiting), the cache across watermark changes, CSV. The real stack's version of the
important paths is tests/integration/test_query_service.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import pytest
from fastapi.testclient import TestClient

from projector.clickhouse import ParamValue, Topology
from projector.commit.consistency import Consistency
from projector.commit.transactions import Watermark
from queries.api import create_app
from queries.cache import ResultCache
from queries.named import load_named_queries
from queries.service import Limits, QueryService, Rows

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeClickHouse:
    """Answers every named query with `self.rows` and records what was bound."""

    topology = Topology()

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = [{"order_id": 1, "total": 9.5}]
        self.calls: list[tuple[str, dict[str, ParamValue]]] = []
        self.fail_with: Exception | None = None

    def execute(self, sql: str) -> None:
        raise AssertionError("the query service never writes")

    def rows_of(self) -> str:
        return "\n".join(json.dumps(r) for r in self.rows)

    def rows(self, sql: str) -> list[dict[str, Any]]:  # type: ignore[override]
        return []

    def text(self, sql: str, fmt: str) -> str:
        return ""

    def query(self, sql: str, fmt: str, params: Mapping[str, ParamValue]) -> str:
        self.calls.append((sql, dict(params)))
        if self.fail_with is not None:
            raise self.fail_with
        return self.rows_of()


class FakePositions:
    """Where the read models stand; `wait_for` advances to `arrives` if one is set."""

    def __init__(self) -> None:
        self.lsn = 1000
        self.arrives: int | None = None
        self.refresh_due = False  # of_now: a refresh is due, the fast path must not answer
        self.tracker = type("T", (), {"groups": {"order_summary": ["shop.orders"]}})()

    def position(self) -> Consistency:
        return Consistency(self.lsn, 1, Watermark("77", self.lsn, 5), None)

    def of(self, read_models: list[str], fresh: bool = False) -> Consistency:
        return self.position()

    def of_now(self, read_models: list[str]) -> Consistency | None:
        return None if self.refresh_due else self.position()

    def wait_for(self, read_models: list[str], lsn: int, timeout_s: float) -> Consistency:
        if self.arrives is not None:
            self.lsn = self.arrives
        return self.position()


@pytest.fixture
def parts() -> tuple[TestClient, FakeClickHouse, FakePositions, QueryService]:
    ch, positions = FakeClickHouse(), FakePositions()
    service = QueryService(
        ch,
        load_named_queries(),
        positions,  # type: ignore[arg-type]
        ResultCache[Rows](100),
        Limits(wait_ms=50),
    )
    return TestClient(create_app(service, TOKEN)), ch, positions, service


def test_every_endpoint_but_health_needs_the_token(parts: Any) -> None:
    client, ch, _, _ = parts
    assert client.get("/health").status_code == 200
    for path in ("/queries", "/queries/order_by_id?order_id=1", "/metrics", "/ops/status"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.json()["error"] == "unauthorised"
            assert answer.headers["www-authenticate"] == "Bearer"
    assert client.post("/sql", json={"sql": "SELECT 1"}).status_code == 401
    assert ch.calls == [], "nothing reached ClickHouse without the token"
    assert client.get("/queries", headers=AUTH).status_code == 200
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'query_requests_total{route="unmatched",status="401"} 13.0' in metrics


def test_the_pages_need_the_token_too_and_ask_browsers_for_it(parts: Any) -> None:
    client, _, _, _ = parts
    basic = {"Authorization": "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}
    for path in ("/", "/docs", "/openapi.json"):
        for headers in ({}, wrong, {"Authorization": "Basic not-base64!"}):
            refused = client.get(path, headers=headers)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["www-authenticate"].startswith("Basic realm="), path
        assert client.get(path, headers=basic).status_code == 200, path
        assert client.get(path, headers=AUTH).status_code == 200, path
    # Basic credentials carry the token to the API as well (the page's own requests)
    assert client.get("/queries", headers=basic).status_code == 200


def test_a_named_query_answers_rows_with_its_watermark(parts: Any) -> None:
    client, ch, _, _ = parts
    answer = client.get("/queries/order_by_id", params={"order_id": "7"}, headers=AUTH)
    assert answer.status_code == 200
    body = answer.json()
    assert body["rows"] == [{"order_id": 1, "total": 9.5}]
    assert body["watermark"]["lsn"] == "0/3E8"
    assert answer.headers["x-watermark-lsn"] == "0/3E8"
    sql, params = ch.calls[-1]
    assert params == {"order_id": "7"}
    assert "{order_id:Int64}" in sql and "7" not in sql.replace("{order_id:Int64}", "")


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/queries/no_such_query", 404, "unknown_query"),
        ("/queries/order_by_id?order_id=abc", 400, "invalid_parameters"),
        ("/queries/order_by_id?order_id=1%20OR%201%3D1", 400, "invalid_parameters"),
        ("/queries/order_by_id?order_id=1&order_id=2", 400, "invalid_parameters"),
        ("/queries/order_by_id?order_id=1&limit=0", 400, "invalid_parameters"),
        ("/queries/order_by_id?order_id=1&limit=x", 400, "invalid_parameters"),
        ("/queries/order_by_id?order_id=1&min_lsn=yesterday", 400, "invalid_parameters"),
        ("/queries/order_by_id?order_id=1&format=xml", 400, "invalid_parameters"),
        (
            "/queries/orders_in_status?status=PENDING%27%3B%20DROP%20TABLE%20x",
            400,
            "invalid_parameters",
        ),
        ("/nowhere", 404, "not_found"),
    ],
)
def test_bad_input_answers_4xx_json_and_never_reaches_clickhouse(
    parts: Any, path: str, status: int, error: str
) -> None:
    client, ch, _, _ = parts
    answer = client.get(path, headers=AUTH)
    assert answer.status_code == status
    assert answer.json()["error"] == error
    assert answer.json()["message"]
    assert ch.calls == []


def test_bad_bodies_of_post_sql_answer_400(parts: Any) -> None:
    client, _, _, _ = parts
    for body in (b"not json", b"{}", b'{"sql": 5}', b'{"sql": "SELECT 1", "extra": 1}'):
        answer = client.post(
            "/sql", content=body, headers=AUTH | {"Content-Type": "application/json"}
        )
        assert answer.status_code == 400, body
        assert answer.json()["error"] == "invalid_parameters"
    assert client.get("/sql", headers=AUTH).status_code == 405


def test_an_unexpected_failure_is_a_json_500_without_traceback(parts: Any) -> None:
    client, ch, _, _ = parts
    ch.fail_with = RuntimeError("boom\nTraceback (most recent call last): secret")
    answer = TestClient(client.app, raise_server_exceptions=False).get(
        "/queries/order_by_id?order_id=1", headers=AUTH
    )
    assert answer.status_code == 500
    assert answer.json()["error"] == "internal"
    assert "Traceback" not in answer.text and "secret" not in answer.text


def test_a_missing_read_model_says_so(parts: Any) -> None:
    client, ch, _, _ = parts
    ch.fail_with = RuntimeError("Code: 60. DB::Exception: Unknown table read_models.order_summary")
    answer = client.get("/queries/order_by_id?order_id=1", headers=AUTH)
    assert answer.status_code == 503
    assert "order_summary" in answer.json()["message"]
    assert "backfilled" in answer.json()["message"] and "min_lsn" in answer.json()["message"]
    # A client waiting for its write (min_lsn passed) hears "behind, coming": 202, Retry-After,
    # and the watermark reached, not an error.
    waiting = client.get("/queries/order_by_id?order_id=1&min_lsn=0/3E8", headers=AUTH)
    assert waiting.status_code == 202, waiting.text
    assert waiting.headers["retry-after"] == "1"
    assert waiting.json()["watermark"]["lsn"] == "0/3E8"


class FailedModels:
    """The read models' health as `ReadModelHealth` gives it: `failed` maps model → reason."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    def failure(self, read_models: list[str]) -> str | None:
        reasons = [f"{m}: {self.failed[m]}" for m in read_models if m in self.failed]
        return "; ".join(reasons) or None


def test_a_failed_read_model_answers_503_with_its_reason_never_its_stale_rows(parts: Any) -> None:
    client, ch, _, service = parts
    health = FailedModels()
    service.health = health
    url = "/queries/order_by_id?order_id=1"
    assert client.get(url, headers=AUTH).status_code == 200  # cached now
    health.failed["order_summary"] = "Code: 395. throwIf: value is non-zero"
    for query in (url, f"{url}&min_lsn=0/3E8", f"{url}&min_lsn=0/3E9"):
        answer = client.get(query, headers=AUTH)
        assert answer.status_code == 503, (query, answer.text)
        assert answer.json()["error"] == "read_model_failed"
        assert "order_summary: Code: 395" in answer.json()["message"]
        assert "projector rebuild" in answer.json()["message"]
    calls = len(ch.calls)
    health.failed.clear()  # rebuilt
    assert client.get(url, headers=AUTH).status_code == 200
    assert len(ch.calls) == calls  # and its cached answer is served again


def test_behind_min_lsn_answers_202_with_the_watermark_and_retry_after(parts: Any) -> None:
    client, ch, positions, _ = parts
    answer = client.get("/queries/order_by_id?order_id=1&min_lsn=0/3E9", headers=AUTH)
    assert answer.status_code == 202
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["x-watermark-lsn"] == "0/3E8"
    assert answer.json()["watermark"]["lsn"] == "0/3E8"
    assert answer.json()["min_lsn"] == "0/3E9"
    assert ch.calls == []
    positions.arrives = 0x3E9  # the projector applies it while the request waits
    answer = client.get("/queries/order_by_id?order_id=1&min_lsn=0/3E9", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["x-watermark-lsn"] == "0/3E9"


def test_the_cache_serves_a_watermark_once_and_recomputes_when_it_moves(parts: Any) -> None:
    client, ch, positions, _ = parts
    url = "/queries/order_by_id?order_id=1"
    first = client.get(url, headers=AUTH)
    ch.rows = [{"order_id": 1, "total": 12.0}]  # ClickHouse changed, the watermark did not
    second = client.get(url, headers=AUTH)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["rows"] == first.json()["rows"]
    assert len(ch.calls) == 1
    positions.lsn = 2000  # the read model moved on: never the old answer again
    third = client.get(url, headers=AUTH)
    assert third.headers["x-cache"] == "miss"
    assert third.json()["rows"] == [{"order_id": 1, "total": 12.0}]
    # asking for a watermark the cached entry does not reach is not answered from it
    fourth = client.get(url + "&min_lsn=0/7D0", headers=AUTH)
    assert fourth.headers["x-cache"] == "hit" and fourth.headers["x-watermark-lsn"] == "0/7D0"
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'query_cache_total{result="hit"} 2.0' in metrics
    assert 'query_cache_total{result="miss"} 2.0' in metrics
    assert 'query_requests_total{route="/queries/order_by_id",status="200"} 4.0' in metrics
    assert 'query_request_seconds_count{route="/queries/order_by_id"} 4.0' in metrics


def test_a_cache_hit_is_answered_before_fastapi_with_the_same_bytes(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, ch, positions, service = parts
    url = "/queries/orders_of_customer?customer_id=3&limit=2"
    asked: list[str] = []
    named = service.named

    def counted(name: str, *args: Any) -> Any:
        asked.append(name)
        return named(name, *args)

    monkeypatch.setattr(service, "named", counted)
    miss = client.get(url, headers=AUTH)
    positions.refresh_due = True  # the fast layer may not refresh: FastAPI answers the hit
    slow = client.get(url, headers=AUTH)
    positions.refresh_due = False
    fast = client.get(url, headers=AUTH)
    assert (miss.headers["x-cache"], slow.headers["x-cache"], fast.headers["x-cache"]) == (
        "miss",
        "hit",
        "hit",
    )
    assert asked == ["orders_of_customer"] * 2, "the last hit never reached FastAPI's route"
    assert fast.content == slow.content and dict(fast.headers) == dict(slow.headers)
    assert len(ch.calls) == 1
    # what the fast layer must leave to FastAPI: a bad token, a bad or repeated parameter, CSV,
    # a min_lsn the read models have not reached (202), a moved watermark (a miss)
    assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(url + "&limit=0", headers=AUTH).status_code == 400
    assert client.get(url + "&customer_id=4", headers=AUTH).status_code == 400
    csv = client.get(url, headers=AUTH | {"Accept": "text/csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert client.get(url + "&min_lsn=0/7D0&wait_ms=0", headers=AUTH).status_code == 202
    positions.lsn = 2000
    assert client.get(url, headers=AUTH).headers["x-cache"] == "miss"
    assert client.get(url + "&min_lsn=0/7D0", headers=AUTH).headers["x-cache"] == "hit"
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'query_cache_total{result="hit"} 4.0' in metrics
    assert 'query_requests_total{route="/queries/orders_of_customer",status="200"} 6.0' in metrics
    assert 'query_request_seconds_count{route="/queries/orders_of_customer"} 9.0' in metrics


def test_pages_and_csv(parts: Any) -> None:
    client, ch, _, _ = parts
    ch.rows = [{"order_id": i, "note": f'a,"b"\n{i}'} for i in range(3)]  # limit + 1 rows
    answer = client.get("/queries/orders_of_customer?customer_id=1&limit=2", headers=AUTH)
    body = answer.json()
    assert [r["order_id"] for r in body["rows"]] == [0, 1]
    assert body["page"] == {"limit": 2, "offset": 0, "next_offset": 2}
    assert "LIMIT 3 OFFSET 0" in ch.calls[-1][0]
    csv_answer = client.get(
        "/queries/orders_of_customer?customer_id=1&limit=2", headers=AUTH | {"Accept": "text/csv"}
    )
    assert csv_answer.headers["content-type"].startswith("text/csv")
    assert csv_answer.text == 'order_id,note\r\n0,"a,""b""\n0"\r\n1,"a,""b""\n1"\r\n'
    assert csv_answer.headers["x-next-offset"] == "2"
    refused = client.get(
        "/queries/orders_of_customer?customer_id=1", headers=AUTH | {"Accept": "application/xml"}
    )
    assert refused.status_code == 406


def test_the_list_documents_every_parameter(parts: Any) -> None:
    client, _, _, _ = parts
    queries = {q["name"]: q for q in client.get("/queries", headers=AUTH).json()["queries"]}
    assert queries["order_by_id"]["parameters"][0]["type"] == "Int64"
    assert queries["orders_in_status"]["parameters"][0]["choices"][0] == "PENDING"
    schema = client.get("/openapi.json", headers=AUTH).json()
    params = schema["paths"]["/queries/order_by_id"]["get"]["parameters"]
    assert {"order_id", "limit", "offset", "min_lsn"} <= {p["name"] for p in params}
