"""A scheduler replica's barrier (`CatchUp`) on a real broker, across a reconnection that
made its private queue anew: the queue is transient, so when its broker node dies the cluster
forgets it and the replica's link declares it again, empty, on another node. A peer's claim
confirmed before then never reaches the replica; the barrier must not say its state covers a
command sent before the new queue existed. (Seen in the chaos run: a ScheduleDomain redelivered
after a broker node died was placed afresh on a second host, the first copy's claim lost with
the dead node's queue.) Here the queue's loss is made without a cluster: the connection is
cut and the queue deleted before the link comes back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pika
import pytest

from protos.base import Message
from protos.codec import Envelope
from protos.scheduler import PlacementSync
from services.bus import Bus
from services.scheduler.catch_up import CLOCK_SKEW_S, CatchUp
from tests.tcp_relay import TcpRelay

pytestmark = pytest.mark.integration


def test_a_queue_made_anew_after_a_reconnection_covers_only_commands_sent_after_it(
    amqp_url: str, make_bus: Callable[..., Bus]
) -> None:
    relay, relayed_url = TcpRelay.for_url(amqp_url)
    with Bus(relayed_url, source=f"catchup-{uuid.uuid4().hex[:6]}") as bus:
        sync = CatchUp(bus, "replica-a")

        def on_event(_env: Envelope, event: Message) -> None:
            if isinstance(event, PlacementSync):
                sync.heard(event)

        sub = bus.subscribe(["scheduler.sync.never"], on_event)
        try:
            sync.attach(sub.decl.name)
            # A command sent once the subscription stood is covered.
            sent_before = sync.attached_at + CLOCK_SKEW_S + 0.1
            assert sync.wait(10, since=sent_before)
            made = bus.link.connections_made
            while time.time() <= sent_before:  # the cut comes after that command
                time.sleep(0.05)

            relay.cut()
            admin = pika.BlockingConnection(pika.URLParameters(amqp_url))
            try:
                admin.channel().queue_delete(sub.decl.name)  # as if its node died
            finally:
                admin.close()
            sent_meanwhile = time.time()
            relay.restore()
            deadline = time.monotonic() + 30
            while bus.link.connections_made == made or not bus.link.connected:
                assert time.monotonic() < deadline, "the link did not come back"
                time.sleep(0.05)

            declared = bus.link.declared_at
            assert declared >= sent_meanwhile
            # Sent before the queue was made anew: what it followed may be lost.
            assert not sync.wait(10, since=sent_before)
            assert not sync.wait(10, since=sent_meanwhile)
            # Sent after it: the marker comes back through the new queue.
            assert sync.wait(10, since=declared + CLOCK_SKEW_S + 0.1)
        finally:
            sub.close()
            relay.close()
