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

HIDDEN = "***"

# (what a credential looks like, what is left of it): the user stays, the password goes.
_RULES = [
    # scheme://user:password@host (registry URLs, postgresql:// DSNs, ClickHouse URLs)
    (re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^@/\s]*@"), rf"\g<keep>:{HIDDEN}@"),
    # password=secret in a key=value DSN or a settings dump (quoted or not)
    (re.compile(r"(?P<keep>\b(?:password|passwd|pwd)\s*=\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,;&]+)",
                re.IGNORECASE), rf"\g<keep>{HIDDEN}"),
]  # fmt: skip


def redact(text: str) -> str:
    """`text` with every password it spells out replaced by ***."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


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
