"""Debezium connector configuration (JSON files in this folder) and the Kafka Connect client.

`projector connectors ...` is the command line over this package.
"""

from connectors.apply import (
    ApplyPlan,
    ApplyResult,
    ConfigChange,
    apply_connector,
    dry_run,
    plan_apply,
)
from connectors.client import ConnectClient, failure_summary
from connectors.config import CaptureSpec, render_connector
from connectors.errors import ConnectorConfigError, ConnectorError, ConnectUnavailable
from connectors.source import IdentityGap, display_name, request_incremental_snapshot

__all__ = [
    "ApplyPlan",
    "ApplyResult",
    "CaptureSpec",
    "ConfigChange",
    "ConnectClient",
    "ConnectUnavailable",
    "ConnectorConfigError",
    "ConnectorError",
    "IdentityGap",
    "apply_connector",
    "display_name",
    "dry_run",
    "failure_summary",
    "plan_apply",
    "render_connector",
    "request_incremental_snapshot",
]
