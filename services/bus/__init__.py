"""AMQP transport on pika: confirmed publishing, RPC, events and the consumer runtime."""

from services.bus.bus import Bus, Subscription
from services.bus.errors import (
    BusError,
    ConnectionLost,
    NoRouteError,
    PublishNacked,
    RemoteError,
    RpcTimeout,
    ServiceError,
)
from services.bus.service import Context, Service, ServiceRunner, handles, on_event

__all__ = [
    "Bus",
    "BusError",
    "ConnectionLost",
    "Context",
    "NoRouteError",
    "PublishNacked",
    "RemoteError",
    "RpcTimeout",
    "Service",
    "ServiceError",
    "ServiceRunner",
    "Subscription",
    "handles",
    "on_event",
]
