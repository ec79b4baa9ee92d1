"""The local real stack (Postgres, Kafka, Kafka Connect + Debezium, schema registry).

This is development infrastructure, not product logic: the projector itself only ever sees
addresses (a Postgres DSN, a Kafka bootstrap, URLs), which `projector stack status --json` prints.
"""

from devstack.errors import ComponentFailed, StackError
from devstack.settings import StackSettings
from devstack.supervisor import ComponentStatus, Stack, healthy

__all__ = ["ComponentFailed", "ComponentStatus", "Stack", "StackError", "StackSettings", "healthy"]
