"""Events into the registry: domain events from the shared durable queue `api.events` (several
API replicas compete for it; seq makes the order they apply them in irrelevant) and volume
events from it into the event log only, heartbeats from a private subscription per replica
(every replica writes the same newest-wins row), coalesced newest per host into one write at
a time (services.api.heartbeats)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from protos.base import Message
from protos.codec import Envelope
from protos.events import DomainEvent
from protos.host import HostHeartbeat
from protos.storage import VolumeEvent
from services.api.heartbeats import HeartbeatWriter
from services.api.metrics import ApiMetrics
from services.api.registry import Registry
from services.api.registry.projection import Outcome
from services.bus import Bus, Context, Service, ServiceRunner, Subscription, on_event
from services.bus.service import Retry
from services.db import DatabaseUnavailable

# Destroy and undefine a domain on a host, off the caller's thread (services.api.reaping).
Reap = Callable[[uuid.UUID, str], None]
# What the event log takes.
E = TypeVar("E", DomainEvent, VolumeEvent)


class EventProjector(Service):
    """Consumes `api.events`; a handler that returns has made the event durable."""

    name = "api"

    def __init__(
        self,
        registry: Registry,
        metrics: ApiMetrics,
        notify: Callable[[], None],
        reap: Reap | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.notify = notify
        self.reap = reap

    @on_event("domain.#")
    def domain_event(self, event: Message, ctx: Context) -> Outcome | None:
        if not isinstance(event, DomainEvent):
            return None
        outcome = self._log(self.registry.events.apply, event, ctx)
        if outcome is Outcome.REAP and self.reap is not None:
            # Deleted before it was placed: off that host again (services.api.reaping).
            self.reap(event.domain_id, event.host)
        return outcome

    @on_event("volume.#")
    def volume_event(self, event: Message, ctx: Context) -> Outcome | None:
        """Into the event log, for `/v1/events` (the volume's project sees it)."""
        if not isinstance(event, VolumeEvent):
            return None
        return self._log(self.registry.events.log_volume, event, ctx)

    def _log(self, write: Callable[..., Outcome], event: E, ctx: Context) -> Outcome:
        """`write` (the registry's) the delivered `event` with its envelope's id, time and
        cause; the database away is a Retry (the broker hands it back later)."""
        try:
            outcome = write(
                ctx.envelope.id,
                ctx.routing_key or event.routing_key(),
                event,
                ctx.envelope.ts,
                correlation_id=ctx.envelope.correlation_id,
                causation_id=ctx.envelope.causation_id,
            )
        except DatabaseUnavailable as exc:
            time.sleep(0.5)
            raise Retry(f"registry unavailable: {exc}") from None
        self.metrics.events.labels(event.TYPE, outcome.value).inc()
        if outcome is not Outcome.DUPLICATE:
            self.notify()
        return outcome


class Projection:
    """The running consumers of one API process."""

    def __init__(
        self,
        bus: Bus,
        registry: Registry,
        metrics: ApiMetrics,
        notify: Callable[[], None],
        reap: Reap | None = None,
    ) -> None:
        self.bus = bus
        self.registry = registry
        projector = EventProjector(registry, metrics, notify, reap)
        self.runner = ServiceRunner(bus, projector, prefetch=64)
        self.heartbeats: Subscription | None = None
        self.writer = HeartbeatWriter(registry)

    def start(self) -> Projection:
        self.runner.start()
        self.writer.start()
        self.heartbeats = self.bus.subscribe(["host.heartbeat.*"], self._heartbeat)
        return self

    def _heartbeat(self, _envelope: Envelope, beat: Message) -> None:
        if isinstance(beat, HostHeartbeat):
            self.writer.offer(beat)

    def stop(self) -> None:
        if self.heartbeats is not None:
            self.heartbeats.close()
        self.writer.stop()
        self.runner.stop(timeout=10)
