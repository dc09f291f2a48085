"""The bus's exceptions. Callers catch `BusError`; `RemoteError` carries a service's answer."""

from __future__ import annotations

from typing import Any


class BusError(Exception):
    """Anything that went wrong moving a message."""


class ConnectionLost(BusError):
    """The broker connection went away (or could not be had in time) before the operation
    finished. A publish that raised this may or may not have reached the broker; commands are
    idempotent by id, so retrying with the same `message_id` is safe."""


class NoRouteError(BusError):
    """A mandatory publish matched no queue (e.g. a command to a host that does not exist)."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(f"no queue bound for {routing_key!r} on exchange {exchange!r}")
        self.exchange = exchange
        self.routing_key = routing_key


class PublishNacked(BusError):
    """The broker refused to take responsibility for a message (basic.nack)."""


class RpcTimeout(BusError):
    """No reply arrived within the timeout. The command may still be executed."""


class RemoteError(BusError):
    """The service answered with an error reply."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class ServiceError(Exception):
    """Raised by a handler to answer with an error reply (and no retry).

    Codes in use: `not_found`, `conflict`, `invalid`, `no_capacity`, `unavailable`, `internal`.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
