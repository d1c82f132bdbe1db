"""Exceptions raised by the wbroker client.

Every error the broker sends back carries a stable code (the C++ side's
ErrorCode wire names) and a message that names the problem; both are kept.
"""


class WbrokerError(Exception):
    """Base class of every error this package raises."""


class BrokerUnavailable(WbrokerError, ConnectionError):
    """No broker answers at the socket path (not running, wrong path, no permission)."""

    def __init__(self, socket_path, reason):
        self.socket_path = socket_path
        self.reason = reason
        super().__init__(f"wbrokerd is not reachable at {socket_path}: {reason} "
                         f"(is wbrokerd running? set WBROKER_SOCKET or pass socket=)")


class ConnectionLost(WbrokerError, ConnectionError):
    """The broker closed the connection (it stopped or restarted)."""


class ProtocolError(WbrokerError):
    """The broker sent something this client cannot accept."""


class BrokerError(WbrokerError):
    """The broker refused a request: `code` is its error code, `message` its words."""

    def __init__(self, code, message, op=None):
        self.code = code
        self.message = message
        self.op = op
        where = f"{op}: " if op else ""
        super().__init__(f"{where}{message} [{code}]")


class ModelNotFound(BrokerError, LookupError):
    """The model or revision is not in the broker's HF cache."""


class PermissionDenied(BrokerError, PermissionError):
    """The broker refused this process (admin verbs, allow-lists)."""


_BY_CODE = {"not_found": ModelNotFound, "permission_denied": PermissionDenied}


def broker_error(code, message, op=None):
    """The exception for a refusal with `code`."""
    return _BY_CODE.get(code, BrokerError)(code, message, op)
