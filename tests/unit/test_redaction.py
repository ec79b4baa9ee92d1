"""`redact` leaves no password in text, and keeps what helps (projector/redaction.py)."""

from __future__ import annotations

import logging

import pytest

from projector.redaction import RedactingFormatter, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "GET http://probe:s3cret@127.0.0.1:18081/apis/ccompat/v7/schemas/ids/4",
            "GET http://probe:***@127.0.0.1:18081/apis/ccompat/v7/schemas/ids/4",
        ),
        ("postgresql://cdc:p%40ss@db:5432/app failed", "postgresql://cdc:***@db:5432/app failed"),
        (
            "SETTINGS format_avro_schema_registry_url = 'https://u:pw@reg/x', max_threads = 1",
            "SETTINGS format_avro_schema_registry_url = 'https://u:***@reg/x', max_threads = 1",
        ),
        ("host=db user=cdc password=s3cret dbname=app", "host=db user=cdc password=*** dbname=app"),
        ("PASSWORD = 'two words'", "PASSWORD = ***"),
        # nothing to hide: unchanged
        ("http://127.0.0.1:18081/apis", "http://127.0.0.1:18081/apis"),
        ("http://user@host/x", "http://user@host/x"),
        ("column ratio: 12:30 is not a number", "column ratio: 12:30 is not a number"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_log_line_and_its_traceback_are_redacted() -> None:
    try:
        raise ConnectionError("http://probe:s3cret@reg:1/x refused")
    except ConnectionError as exc:
        record = logging.LogRecord(
            "projector",
            logging.WARNING,
            __file__,
            1,
            "fetching %s failed",
            ("http://probe:s3cret@reg:1/x",),
            (type(exc), exc, exc.__traceback__),
        )
    line = RedactingFormatter("%(message)s").format(record)
    assert "s3cret" not in line
    assert line.startswith("fetching http://probe:***@reg:1/x failed")
    assert "ConnectionError: http://probe:***@reg:1/x refused" in line


def test_a_crash_prints_a_redacted_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from projector.redaction import redacting_excepthook

    try:
        raise RuntimeError("registry http://probe:s3cret@reg:1/x refused")
    except RuntimeError as exc:
        redacting_excepthook(RuntimeError, exc, exc.__traceback__)
    printed = capsys.readouterr().err
    assert "Traceback" in printed and "s3cret" not in printed
    assert "http://probe:***@reg:1/x" in printed


def test_the_command_line_never_prints_typers_tracebacks_with_locals() -> None:
    import sys

    from projector import cli

    assert cli.app.pretty_exceptions_enable is False
    assert sys.excepthook.__name__ == "redacting_excepthook"
