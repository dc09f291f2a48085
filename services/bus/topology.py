"""Exchanges, queues and bindings, declared idempotently over a short blocking connection.

Declaring is synchronous and rare (once per (re)connection), so it uses pika's
BlockingConnection instead of threading callbacks through the I/O loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from protos import routing
from services.bus.nodes import NodeList

QUORUM_ARGS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": routing.DEAD_EXCHANGE,
    "x-delivery-limit": routing.DELIVERY_LIMIT,
}
SUBSCRIBER_EXPIRES_MS = 60_000
ACCESS_REFUSED = 403


@dataclass(frozen=True)
class QueueDecl:
    """A queue and what it is bound to. `kind` is `command` (quorum, bound to the commands
    exchange by its own name), `events` (quorum, bound to the events exchange by `patterns`),
    `subscriber` (classic and transient, expires a minute after its last consumer left) or
    `dead` (the dead-letter queue).

    Quorum queues get a member on every node of the cluster as it stands when they are first
    declared: that is RabbitMQ's default initial group size (all nodes, up to 3.12), so the
    cluster must be formed before the services first start."""

    name: str
    kind: str = "command"
    patterns: tuple[str, ...] = field(default=())

    def arguments(self) -> dict[str, Any]:
        if self.kind == "subscriber":
            return {"x-expires": SUBSCRIBER_EXPIRES_MS}
        return dict(QUORUM_ARGS)


BASE_QUEUES = tuple(QueueDecl(name) for name in routing.SERVICE_QUEUES)


Nodes: TypeAlias = pika.URLParameters | list[pika.URLParameters]


def declare(params: Nodes, queues: list[QueueDecl]) -> None:
    """Declare the exchanges, the shared queues (dead letters, service queues) and `queues`
    (on the first of `params`' nodes that answers).

    The shared queues are asserted best-effort: where the broker's definitions manage them and
    this service's user has no rights on them (deploy/rabbitmq/definitions.json), the refusal
    is skipped. The exchanges and this process's own `queues` must succeed.
    """
    connection = pika.BlockingConnection(params)
    try:
        ch = connection.channel()
        ch.exchange_declare(routing.COMMANDS_EXCHANGE, "direct", durable=True)
        ch.exchange_declare(routing.EVENTS_EXCHANGE, "topic", durable=True)
        ch.exchange_declare(routing.DEAD_EXCHANGE, "fanout", durable=True)
        shared = [
            QueueDecl(routing.DEAD_QUEUE, kind="dead"),
            *(decl for decl in BASE_QUEUES if decl.name not in {q.name for q in queues}),
        ]
        for decl in shared:
            try:
                _declare_queue(ch, decl)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != ACCESS_REFUSED:
                    raise
                ch = connection.channel()  # the refusal closed the channel
        for decl in queues:
            _declare_queue(ch, decl)
    finally:
        if connection.is_open:
            connection.close()


def _declare_queue(ch: BlockingChannel, decl: QueueDecl) -> None:
    if decl.kind == "dead":
        ch.queue_declare(decl.name, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(decl.name, routing.DEAD_EXCHANGE, routing_key="")
        return
    # A subscriber's classic queue is transient: when its node dies the cluster forgets it and
    # the subscriber's next declaration makes it again on a live node (a durable one would
    # stay bound to the dead node, refusing every declaration with 404 until it is back).
    durable = decl.kind != "subscriber"
    ch.queue_declare(decl.name, durable=durable, arguments=decl.arguments())
    if decl.kind == "command":
        ch.queue_bind(decl.name, routing.COMMANDS_EXCHANGE, routing_key=decl.name)
    for pattern in decl.patterns:
        ch.queue_bind(decl.name, routing.EVENTS_EXCHANGE, routing_key=pattern)


def delete_queue(params: Nodes, name: str) -> None:
    connection = pika.BlockingConnection(params)
    try:
        connection.channel().queue_delete(name)
    finally:
        if connection.is_open:
            connection.close()


class Rebinder:
    """Declares a queue (binding its patterns) and unbinds others from the events exchange
    (unbinding what is not bound is no error), on one connection kept between calls: a new
    one each time cost 10-30 ms on a busy host (TCP, the AMQP handshake, a channel), which a
    compute node paid on the start of every guest whose network was new on the host. The
    connection is one of `nodes` (services.bus.nodes.blocking_nodes: no heartbeats, as it is
    idle between calls), and one the broker or the network closed meanwhile is replaced and
    the call made again. Not thread-safe: one caller at a time."""

    def __init__(self, nodes: NodeList) -> None:
        self._nodes = nodes
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def rebind(self, decl: QueueDecl, unbind: list[str]) -> None:
        for attempt in range(2):
            try:
                ch = self._open()
                _declare_queue(ch, decl)
                for pattern in unbind:
                    ch.queue_unbind(decl.name, routing.EVENTS_EXCHANGE, routing_key=pattern)
                return
            except (pika.exceptions.AMQPError, OSError):
                self.close()
                if attempt:
                    raise

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        self._connection, _params = self._nodes.connect()
        self._channel = self._connection.channel()
        return self._channel

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # already broken: nothing to release but the socket
                pass
