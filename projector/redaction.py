"""Credentials never leave the process in text: the one place that blanks them out.

A registry URL may carry `user:password@`, a Postgres DSN `user:password@` or `password=...`;
they reach log lines (httpx logs every request's URL), exception messages (the registry client and
ClickHouse quote the URL they failed on), dead letters' reasons and the command line's errors.
Every such text passes through `redact` on its way out: the log formatter of the projector's
commands (`configure_logging`), `DeadLetter.of`, and the command line's `fail`.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from types import TracebackType
from typing import Any

HIDDEN = "***"

# Names whose value is a secret: `password`, `CDC_PASSWORD`, `PGPASSWORD`, `admin_pwd`,
# `PROJECTOR_API_TOKEN`, `clickhouse_password` ...
SECRET_NAME = r"\w*(?:password|passwd|pwd|api_token|salt)"

# (what a credential looks like, what is left of it): the user stays, the password goes.
_RULES = [
    # Debezium's masking setting carries its salt in its name: column.mask.hash.v2.…with.salt.<salt>
    (re.compile(r"(?P<keep>\bwith\.salt\.)[A-Za-z0-9_-]+"), rf"\g<keep>{HIDDEN}"),
    # scheme://user:password@host (registry URLs, postgresql:// DSNs, ClickHouse URLs)
    (
        re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^@/\s]*@"),
        rf"\g<keep>:{HIDDEN}@",
    ),
    # password=secret, PGPASSWORD=secret, CDC_PASSWORD: secret in a key=value DSN, an environment
    # or settings dump (quoted or not)
    (
        re.compile(
            rf"(?P<keep>\b{SECRET_NAME}\s*[=:]\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,;&'\"]+)",
            re.IGNORECASE,
        ),
        rf"\g<keep>{HIDDEN}",
    ),
    # "clickhouse_password": "secret" in JSON, 'password': 'secret' in a Python repr
    (
        re.compile(
            rf"(?P<keep>([\"']){SECRET_NAME}\2\s*:\s*)(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')",
            re.IGNORECASE,
        ),
        rf"\g<keep>\g<2>{HIDDEN}\g<2>",
    ),
]
_SECRET_KEY = re.compile(rf"^{SECRET_NAME}$", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every password it spells out replaced by ***."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def redact_values(value: Any) -> Any:
    """A JSON-like structure (a status report, an ops sample) with every string redacted and
    the value of every key that names a secret replaced: what may be printed or served."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            key: HIDDEN
            if isinstance(key, str) and _SECRET_KEY.match(key) and val
            else redact_values(val)
            for key, val in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value


class RedactingFormatter(logging.Formatter):
    """Formats a record as usual (message, arguments, traceback), then redacts the whole text."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """The projector commands' logging: every line redacted, and an uncaught exception's
    traceback too."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    sys.excepthook = redacting_excepthook


def redacting_excepthook(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """`sys.excepthook` that prints the traceback as Python would, redacted (no local variables:
    a configuration's repr holds passwords)."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))
