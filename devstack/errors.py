"""Errors of the local stack, each phrased so a person can act on it."""


class StackError(RuntimeError):
    """Something about the local stack went wrong; the message says what to do."""


class ComponentFailed(StackError):
    """A component did not become healthy; carries its name and the tail of its log."""

    def __init__(self, component: str, reason: str, log_tail: str = "") -> None:
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        message = f"{component} did not start: {reason}"
        if log_tail:
            message += f"\n--- last lines of its log ---\n{log_tail}"
        super().__init__(message)
