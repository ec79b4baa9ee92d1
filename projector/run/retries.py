"""Retrying what is only away for a while: ClickHouse, the registry, Postgres, Kafka.

A transient failure is retried with full-jitter exponential back-off, logged once when it starts
and once when it clears; the work is then done as if nothing happened. Anything else is not
retried here: it is a bug, a refusal or a poison message, and its owner decides.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from projector.errors import ClickHouseUnavailable, KafkaUnavailable, SourceUnavailable
from schemas.errors import RegistryUnavailable

log = logging.getLogger("projector")
T = TypeVar("T")
TRANSIENT: tuple[type[Exception], ...] = (
    ClickHouseUnavailable,
    RegistryUnavailable,
    SourceUnavailable,
    KafkaUnavailable,
)


def with_retries(
    action: Callable[[], T],
    what: str,
    stop: Callable[[], bool] = lambda: False,
    base_s: float = 0.2,
    cap_s: float = 30.0,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Run `action`, retrying transient failures with full-jitter exponential back-off (`sleep`
    waits, `time.sleep` looked up when called; the main thread's keeps polling Kafka)."""
    attempt = 0
    while True:
        try:
            result = action()
        except TRANSIENT as exc:
            if attempt == 0:
                log.warning("%s failed, retrying with back-off: %s", what, exc)
            attempt += 1
            if stop() and attempt > 3:
                raise
            (sleep or time.sleep)(random.uniform(0, min(cap_s, base_s * 2**attempt)))
            continue
        if attempt:
            log.warning("%s recovered after %d retries", what, attempt)
        return result
