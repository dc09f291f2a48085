"""Catching a replica's view up with the broker: a barrier through its own subscription queue.

A replica's state is fed by its private subscription (heartbeats, domain events, peer claims),
which runs behind the broker by however many events sit in the queue. `CatchUp.wait()` sends a
`PlacementSync` marker straight to that queue (default exchange, routing key = queue name) and
waits until the subscription thread reads it back. A queue is FIFO, so every event the broker
had put in the queue before the marker (a peer's `claimed` that the broker confirmed before the
peer called a compute node, say) has been applied by then.
"""

from __future__ import annotations

import threading
import time
import uuid

import structlog

from protos.codec import envelope_for
from protos.scheduler import PlacementSync
from services.bus import Bus

log = structlog.get_logger("flotilla.scheduler")

CLOCK_SKEW_S = 1.0  # how far apart two machines' clocks may be, as far as `since` goes


class CatchUp:
    """The barrier of one replica; `attach(queue)` once its subscription exists."""

    def __init__(self, bus: Bus, replica: str) -> None:
        self.bus = bus
        self.replica = replica
        self.queue: str | None = None
        self.attached_at = 0.0  # wall clock: events published before it never reached us
        self._lock = threading.Lock()
        self._waiting: dict[str, threading.Event] = {}

    def attach(self, queue: str) -> None:
        self.queue = queue
        self.attached_at = time.time()

    def wait(self, timeout: float, *, since: float) -> bool:
        """True once every event queued for this replica before the call has been applied and
        the subscription already existed at wall-clock `since` (less `CLOCK_SKEW_S`, as the
        time may come from another machine); False if that could not be shown within
        `timeout` (no subscription, a younger one, no confirm, the marker not back in time).
        Never raises for the broker's sake.

        The subscription counts as younger again after each reconnection of the bus: a
        private queue is transient, so one whose broker node died was made anew, empty, when
        the link declared it on another node, and a peer's claim confirmed before then is
        not in it (a replica that took it as covered placed a redelivered command afresh,
        on a second host)."""
        attached = max(self.attached_at, self.bus.link.declared_at)
        if self.queue is None or since < attached + CLOCK_SKEW_S:
            return False
        deadline = time.monotonic() + timeout
        token = uuid.uuid4().hex
        heard = threading.Event()
        with self._lock:
            self._waiting[token] = heard
        try:
            marker = PlacementSync(replica=self.replica, token=token)
            envelope = envelope_for(marker, source=self.bus.source)
            future = self.bus.publish_envelope(
                "", self.queue, envelope, mandatory=True, persistent=False
            )
            future.result(timeout)
            return heard.wait(max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("claim stream did not catch up", error=str(exc))
            return False
        finally:
            with self._lock:
                self._waiting.pop(token, None)

    def heard(self, marker: PlacementSync) -> None:
        """The subscription read `marker` back (called on its thread, in queue order)."""
        with self._lock:
            waiting = self._waiting.get(marker.token)
        if waiting is not None:
            waiting.set()
