"""Every test runs against the suite's own stack state (tests/stack.env): a directory and ports
of its own, never the stack `make demo` shows."""

from __future__ import annotations

import os
from pathlib import Path

STACK_ENV = Path(__file__).with_name("stack.env")
CHECKOUT = Path(__file__).resolve().parent.parent


def suite_stack_environment() -> dict[str, str]:
    """tests/stack.env's settings, the state directory made absolute (in the checkout)."""
    found: dict[str, str] = {}
    for line in STACK_ENV.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.lstrip().startswith("#"):
            found[name.strip()] = value.strip()
    found["PROJECTOR_STATE_DIR"] = str(CHECKOUT / found["PROJECTOR_STATE_DIR"])
    return found


for _name, _value in suite_stack_environment().items():
    os.environ.setdefault(_name, _value)  # the environment wins: a run may move it again
