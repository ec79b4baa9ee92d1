"""The local real stack (Postgres, Kafka, Kafka Connect + Debezium, schema registry).

This is development infrastructure, not product logic: the projector itself only ever sees
addresses (a Postgres DSN, a Kafka bootstrap, URLs), which `projector stack status --json` prints.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from devstack.errors import ComponentFailed, StackError

if TYPE_CHECKING:
    from devstack.settings import StackSettings
    from devstack.supervisor import ComponentStatus, Stack, healthy

# Loaded on first use: `projector` loads devstack.cli, a module of this package, on every start
# (its commands), and every command (`projector sql`, `projector run`) would otherwise load the
# supervisor and its settings too (about 0.2 s of CPU each start; the integration suite starts
# hundreds).
_LAZY = {
    "StackSettings": "devstack.settings",
    "ComponentStatus": "devstack.supervisor",
    "Stack": "devstack.supervisor",
    "healthy": "devstack.supervisor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'devstack' has no attribute {name!r}")


__all__ = ["ComponentFailed", "ComponentStatus", "Stack", "StackError", "StackSettings", "healthy"]
