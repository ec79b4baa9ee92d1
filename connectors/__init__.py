"""Debezium connector configuration (JSON files in this folder) and the Kafka Connect client.

`projector connectors ...` is the command line over this package.
"""

from connectors.apply import ApplyResult, apply_connector
from connectors.client import ConnectClient
from connectors.config import CaptureSpec, render_connector
from connectors.errors import ConnectorConfigError, ConnectorError, ConnectUnavailable

__all__ = [
    "ApplyResult",
    "CaptureSpec",
    "ConnectClient",
    "ConnectUnavailable",
    "ConnectorConfigError",
    "ConnectorError",
    "apply_connector",
    "render_connector",
]
