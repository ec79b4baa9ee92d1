"""Secrets never leave through what the service and the commands print: the ops page's status
(which quotes the Kafka Connect and metrics URLs, with their `user:password`, in its notes and
errors) and the one redaction every way out uses (projector/redaction.py)."""

from __future__ import annotations

import httpx
import pytest

from projector.clickhouse import ChdbBackend, ServerBackend
from projector.redaction import redact, redact_values
from tests.security.conftest import AUTH, running_service

CONNECT_SECRET, METRICS_SECRET = "connect-hunter2", "metrics-hunter3"


def test_the_ops_status_shows_no_password(
    engine: ChdbBackend | ServerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONNECT_URL", f"http://admin:{CONNECT_SECRET}@127.0.0.1:9")
    with running_service(
        engine,
        projector_metrics_url=f"http://m:{METRICS_SECRET}@127.0.0.1:9/metrics",
        ops_sample_s=0.2,
    ) as url:
        text = ""
        for _ in range(100):  # until a sample with the connector's and the metrics' notes
            text = httpx.get(f"{url}/ops/status", headers=AUTH).text
            if "127.0.0.1:9" in text:
                break
            httpx.get(f"{url}/health")
        assert "admin:***@127.0.0.1:9" in text or "m:***@127.0.0.1:9" in text, text
        assert CONNECT_SECRET not in text and METRICS_SECRET not in text, text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("PGPASSWORD=pg-secret psql -h db", "pg-secret"),
        ("CDC_PASSWORD=cdc-secret", "cdc-secret"),
        ("PROJECTOR_API_TOKEN=token-secret", "token-secret"),
        ('{"clickhouse_password": "ch-secret", "user": "default"}', "ch-secret"),
        ("{'password': 'repr-secret'}", "repr-secret"),
        ("postgresql://app:dsn-secret@db:5432/app", "dsn-secret"),
        ("host=db password='spaced secret' user=app", "spaced secret"),
    ],
)
def test_every_form_of_a_password_is_redacted(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "***" in redact(text)


def test_a_report_is_redacted_through_and_through() -> None:
    report = {
        "connector": {"error": "Kafka Connect at http://a:s1@h:8083 is not reachable"},
        "env": [{"CDC_PASSWORD": "s2"}],
        "cdc_password": "s3",
        "lag": 7,
    }
    shown = str(redact_values(report))
    assert all(secret not in shown for secret in ("s1", "s2", "s3")), shown
    assert redact_values(report)["lag"] == 7
