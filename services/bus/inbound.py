"""A message being handled by the consumer runtime, and how to settle it on the channel it
came from: a delivery from the bus's shared I/O thread (event queues) or one a command worker
took on its own connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pika.spec
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from protos import routing
from services.bus.link import Delivery, Link

log = structlog.get_logger("flotilla.bus")


class Inbound(Protocol):
    """A message being handled, and how to settle it on the channel it came from."""

    @property
    def body(self) -> bytes: ...

    @property
    def properties(self) -> pika.spec.BasicProperties: ...

    @property
    def redelivered(self) -> bool: ...

    @property
    def routing_key(self) -> str: ...

    @property
    def queue(self) -> str: ...

    def ack(self) -> None: ...

    def nack(self, *, requeue: bool) -> None: ...

    def reply(self, routing_key: str, body: bytes, props: pika.spec.BasicProperties) -> None: ...

    def dead_letter(self, body: bytes, props: pika.spec.BasicProperties) -> None:
        """Publish to the dead-letter exchange and return once the broker confirmed it."""


@dataclass
class LinkInbound:
    """A delivery from the shared I/O thread (event queues)."""

    delivery: Delivery
    link: Link

    @property
    def body(self) -> bytes:
        return self.delivery.body

    @property
    def properties(self) -> pika.spec.BasicProperties:
        return self.delivery.properties

    @property
    def redelivered(self) -> bool:
        return self.delivery.redelivered

    @property
    def routing_key(self) -> str:
        return self.delivery.routing_key

    @property
    def queue(self) -> str:
        return self.delivery.consumer.queue

    def ack(self) -> None:
        self.link.ack(self.delivery)

    def nack(self, *, requeue: bool) -> None:
        self.link.nack(self.delivery, requeue=requeue)

    def reply(self, routing_key: str, body: bytes, props: pika.spec.BasicProperties) -> None:
        self.link.publish_unconfirmed("", routing_key, body, props)

    def dead_letter(self, body: bytes, props: pika.spec.BasicProperties) -> None:
        self.link.publish(routing.DEAD_EXCHANGE, self.queue, body, props).result(30.0)


@dataclass
class ChannelInbound:
    """A delivery taken by a worker thread on its own connection (command queues)."""

    channel: BlockingChannel
    confirm_channel: BlockingChannel
    tag: int
    body: bytes
    properties: pika.spec.BasicProperties
    redelivered: bool
    routing_key: str
    queue: str

    def ack(self) -> None:
        self.channel.basic_ack(self.tag)

    def nack(self, *, requeue: bool) -> None:
        self.channel.basic_nack(self.tag, requeue=requeue)

    def reply(self, routing_key: str, body: bytes, props: pika.spec.BasicProperties) -> None:
        self.channel.basic_publish("", routing_key, body, props)

    def dead_letter(self, body: bytes, props: pika.spec.BasicProperties) -> None:
        # A confirm-mode BlockingChannel returns only once the broker confirmed.
        self.confirm_channel.basic_publish(routing.DEAD_EXCHANGE, self.queue, body, props)


def dead_letter(inbound: Inbound, reason: str) -> None:
    """Move the message to the dead-letter exchange with `reason` in its headers (and the
    queue it came from), then ack it: nothing is lost, and the consumer goes on."""
    log.warning("message dead-lettered", reason=reason, queue=inbound.queue)
    props = inbound.properties
    headers = dict(props.headers or {})
    headers[routing.REASON_HEADER] = reason[:1000]
    headers[routing.QUEUE_HEADER] = inbound.queue
    props.headers = headers
    inbound.dead_letter(inbound.body, props)  # returns once the broker confirmed it
    inbound.ack()
