"""A message being handled by the consumer runtime, and how to settle it on the channel it
came from: a delivery from the bus's shared I/O thread (event queues) or one a command worker
took on its own connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pika
import pika.exceptions
import pika.spec
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from protos import routing
from services.bus.errors import NoRouteError
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
        # Mandatory: a dead letter no queue takes (the dead-letter queue unbound) is
        # NoRouteError, and the caller requeues the message, instead of a confirmed loss.
        self.link.publish(routing.DEAD_EXCHANGE, self.queue, body, props, mandatory=True).result(
            30.0
        )


# What a publish on a channel the broker refused or closed raises; the connection is fine.
_CHANNEL_REFUSED = (
    pika.exceptions.NackError,
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
)


class DeadLetterChannel:
    """A command worker's confirm-mode channel for dead letters, on the worker's connection.

    Like the Link's publish channel (services.bus.link), it is replaced when the broker
    refuses it: a nack (RabbitMQ 3.10 keeps nacking a channel whose first route to a quorum
    queue went to a dead leader) or a channel error (the broker closed it) would otherwise
    fail every later dead letter of that worker. A failed publish is tried once more on a
    fresh channel; if that fails too the error is raised (the caller requeues the message).
    The channel is opened on the first dead letter. Used by its worker's thread only.
    """

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self._connection = connection
        self._channel: BlockingChannel | None = None
        self.opened = 0  # channels opened so far

    def publish(self, routing_key: str, body: bytes, props: pika.spec.BasicProperties) -> None:
        """Publish to the dead-letter exchange; return once the broker confirmed it and a
        queue took it. NoRouteError when none did (mandatory: the broker would otherwise
        confirm a dead letter it dropped, e.g. with the dead-letter queue unbound)."""
        for attempt in (1, 2):
            channel = self._open()
            try:
                # A confirm-mode BlockingChannel returns only once the broker confirmed.
                channel.basic_publish(
                    routing.DEAD_EXCHANGE, routing_key, body, props, mandatory=True
                )
                return
            except pika.exceptions.UnroutableError:
                raise NoRouteError(routing.DEAD_EXCHANGE, routing_key) from None
            except _CHANNEL_REFUSED as exc:
                self._discard(channel)
                if attempt == 2:
                    raise
                log.warning(
                    "dead-letter channel refused by the broker; replacing it", error=str(exc)
                )

    def _open(self) -> BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            channel = self._connection.channel()
            channel.confirm_delivery()
            self._channel = channel
            self.opened += 1
        return self._channel

    def _discard(self, channel: BlockingChannel) -> None:
        self._channel = None
        if channel.is_open:
            try:
                channel.close()
            except pika.exceptions.AMQPError:
                log.debug("refused dead-letter channel already closing")


@dataclass
class ChannelInbound:
    """A delivery taken by a worker thread on its own connection (command queues)."""

    channel: BlockingChannel
    dead_letters: DeadLetterChannel
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
        self.dead_letters.publish(self.queue, body, props)


def dead_letter(inbound: Inbound, reason: str) -> None:
    """Move the message to the dead-letter exchange with `reason` in its headers (and the
    queue it came from), then ack it: nothing is lost, and the consumer goes on. Raises
    (the message not acked) when the broker did not confirm it or no queue took it."""
    props = inbound.properties
    headers = dict(props.headers or {})
    headers[routing.REASON_HEADER] = reason[:1000]
    headers[routing.QUEUE_HEADER] = inbound.queue
    props.headers = headers
    inbound.dead_letter(inbound.body, props)  # returns once the broker confirmed it
    log.warning("message dead-lettered", reason=reason, queue=inbound.queue)
    inbound.ack()
