"""Errors of connector configuration and of the Kafka Connect REST API."""


class ConnectorError(RuntimeError):
    """Base class; the message says what to do."""


class ConnectorConfigError(ConnectorError):
    """A connector file or its environment is incomplete or malformed."""


class ConnectUnavailable(ConnectorError):
    """Kafka Connect's REST API cannot be reached."""


class ConnectRequestFailed(ConnectorError):
    """Kafka Connect answered a request with an error."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"Kafka Connect refused {method} {path} (HTTP {status}): {body[:500]}")
