"""AMQP transport on pika: confirmed publishing, RPC, events and the consumer runtime."""

import services.bus.batching  # noqa: F401  (pika's read size, for every connection: see there)
from services.bus.bus import Bus, Subscription
from services.bus.cause import Cause, caused_by, current_cause
from services.bus.errors import (
    BusError,
    ConnectionLost,
    NoRouteError,
    PublishNacked,
    RemoteError,
    RpcTimeout,
    ServiceError,
)
from services.bus.nodes import BrokerUrls
from services.bus.service import (
    Context,
    Expired,
    Retry,
    Service,
    ServiceRunner,
    handles,
    on_event,
)

__all__ = [
    "BrokerUrls",
    "Bus",
    "BusError",
    "Cause",
    "ConnectionLost",
    "Context",
    "Expired",
    "NoRouteError",
    "PublishNacked",
    "RemoteError",
    "Retry",
    "RpcTimeout",
    "Service",
    "ServiceError",
    "ServiceRunner",
    "Subscription",
    "caused_by",
    "current_cause",
    "handles",
    "on_event",
]
