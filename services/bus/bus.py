"""The bus a Flotilla process talks through: commands, RPC, events and subscriptions.

    bus = Bus(url, source="scheduler")
    bus.start()
    info = bus.call(compute_queue("node-1"), GetDomainInfo(domain_id=...), timeout=5)
    bus.publish_event(DomainStarted(...))

Commands and events are persistent and confirmed; commands are `mandatory`, so a command to a
queue that does not exist raises `NoRouteError` instead of vanishing.
"""

from __future__ import annotations

import queue as queue_mod
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import pika
import pika.spec
import structlog

from protos import routing
from protos.base import Message
from protos.codec import (
    CONTENT_TYPE,
    DecodeError,
    Envelope,
    check_version,
    decode,
    decode_head,
    envelope_for,
    pack,
    parse_body,
)
from protos.commands import Command
from protos.replies import ErrorReply
from services.bus.cause import Cause, current_cause
from services.bus.confirm import Confirmation
from services.bus.errors import ConnectionLost, RemoteError, RpcTimeout
from services.bus.inbound import LinkInbound, dead_letter
from services.bus.link import Consumer, Delivery, Link
from services.bus.nodes import blocking_nodes
from services.bus.rpc import RpcClient
from services.bus.topology import QueueDecl, Rebinder, declare, delete_queue

R = TypeVar("R", bound=Message)
T = TypeVar("T")
log = structlog.get_logger("flotilla.bus")
PERSISTENT = pika.DeliveryMode.Persistent
_PERSISTENT = PERSISTENT.value
_TRANSIENT = pika.DeliveryMode.Transient.value


class RoutedEvent(Protocol):
    """An event message: it knows its own routing key."""

    TYPE: str

    def routing_key(self) -> str: ...


def properties_for(
    envelope: Envelope,
    *,
    persistent: bool = True,
    reply_to: str | None = None,
    headers: dict[str, Any] | None = None,
) -> pika.BasicProperties:
    """AMQP properties mirroring the envelope.

    The same object `pika.BasicProperties(content_type=..., ...)` makes, filled in directly:
    its constructor's keyword handling is a measurable share of a publish's cost
    (tests/unit/test_bus_properties.py checks the two agree, attribute for attribute)."""
    props: pika.BasicProperties = object.__new__(pika.BasicProperties)
    props.__dict__ = {
        "content_type": CONTENT_TYPE,
        "content_encoding": None,
        "headers": headers,
        "delivery_mode": _PERSISTENT if persistent else _TRANSIENT,
        "priority": None,
        "correlation_id": envelope.correlation_id,
        "reply_to": reply_to,
        "expiration": None,
        "message_id": envelope.id,
        "timestamp": int(envelope.ts),
        "type": envelope.type,
        "user_id": None,
        "app_id": None,
        "cluster_id": None,
    }
    return props


def _rpc_properties(envelope: Envelope) -> pika.BasicProperties:
    """An RPC request's properties: as `properties_for`, but the AMQP correlation_id (what the
    reply is matched by) is the request's own message id, unique per call; the chain's
    correlation id travels in the envelope."""
    props = properties_for(envelope)
    props.correlation_id = envelope.id
    return props


class Bus:
    """A connection to the broker for one process. Thread-safe."""

    def __init__(self, url: str, *, source: str) -> None:
        self.source = source
        self.url = url
        self._queues: dict[str, QueueDecl] = {}
        self.link = Link(url, name=source, declarations=lambda: list(self._queues.values()))
        self._rpc = RpcClient(url, source)

    def start(self, timeout: float = 30.0) -> Bus:
        self.link.start(timeout)
        return self

    def close(self) -> None:
        self._rpc.close()
        self.link.close()

    def __enter__(self) -> Bus:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def declare(self, decl: QueueDecl) -> None:
        """Make `decl` part of this process's topology, declared now and on every reconnect."""
        self.declare_only(decl)
        declare(self.link.nodes.in_order(), [decl])

    def declare_only(self, decl: QueueDecl) -> None:
        """Make `decl` part of the topology declared on every reconnect, not now."""
        self._queues[decl.name] = decl

    # ---- publishing ------------------------------------------------------------------------

    def publish_envelope(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        *,
        mandatory: bool,
        reply_to: str | None = None,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> Confirmation:
        props = properties_for(envelope, persistent=persistent, reply_to=reply_to, headers=headers)
        return self.link.publish(exchange, routing_key, pack(envelope), props, mandatory=mandatory)

    def send(
        self,
        queue: str,
        command: Command,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        message_id: str | None = None,
        timeout: float = 30.0,
        expires_in: float | None = None,
    ) -> str:
        """Cast `command` to `queue` (no reply) and wait for the broker's confirm. With
        `expires_in`, a worker that takes it more than that many seconds later does not run
        it (it is dead-lettered, reason `expired`).

        Returns the message id. Raises NoRouteError for an unknown queue and ConnectionLost if
        no confirm came within `timeout`.
        """
        cause = current_cause() or Cause()
        envelope = envelope_for(
            command,
            source=self.source,
            correlation_id=correlation_id or cause.correlation_id or str(uuid.uuid4()),
            causation_id=causation_id or cause.causation_id,
            message_id=message_id,
            expires_in=expires_in,
        )
        future = self.publish_envelope(routing.COMMANDS_EXCHANGE, queue, envelope, mandatory=True)
        _wait(future, timeout)
        return envelope.id

    def publish_event(
        self, event: Message, *, causation_id: str | None = None, timeout: float = 30.0
    ) -> str:
        """Publish an event (persistent, confirmed) on its routing key; return its id.
        It carries the current cause (services.bus.cause) unless `causation_id` is given."""
        future, message_id = self.publish_event_async(event, causation_id=causation_id)
        _wait(future, timeout)
        return message_id

    def publish_event_async(
        self, event: Message, *, causation_id: str | None = None, message_id: str | None = None
    ) -> tuple[Confirmation, str]:
        """Publish an event without waiting; return the confirm Future and the message id."""
        routing_key = _routing_key(event)
        cause = current_cause() or Cause()
        envelope = envelope_for(
            event,
            source=self.source,
            correlation_id=cause.correlation_id,
            causation_id=causation_id or cause.causation_id,
            message_id=message_id,
        )
        future = self.publish_envelope(
            routing.EVENTS_EXCHANGE,
            routing_key,
            envelope,
            mandatory=False,
            headers=extra_routing_headers(event),
        )
        return future, envelope.id

    # ---- RPC ---------------------------------------------------------------------------------

    def call(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float = 30.0,
        message_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        expires: bool = False,
    ) -> Message:
        """Send `command` to `queue` and return its reply (a `command.RESULT`).

        `expires`: the command expires when this call gives up (its envelope's `expires_at`
        is its time plus `timeout`): a worker that takes it later dead-letters it (reason
        `expired`) instead of running it, for a caller that will have done something else
        by then. A call again with the same `message_id` sends a fresh expiry.

        The command carries `correlation_id` and `causation_id`, by default the current cause's
        (services.bus.cause); a call outside any cause starts a new chain with a fresh
        correlation id. The reply is matched by the command's message id (the AMQP
        correlation_id of an RPC request; see `_rpc_properties`), never by the chain's id, so
        a late reply to an earlier call of the same chain is never taken for this one's.

        Runs in the caller's thread on that thread's own connection (services.bus.rpc).
        Raises RemoteError for an error reply, RpcTimeout when none came in time,
        NoRouteError for an unknown queue and ConnectionLost if the broker cannot be reached
        (a connection lost while waiting is replaced and the command resent with the same id
        until `timeout`; the command may or may not have run when ConnectionLost or
        RpcTimeout is raised, and it is safe to call again with the same `message_id`).
        """
        props, data = self._request(
            queue, command, timeout, message_id, correlation_id, causation_id, expires=expires
        )
        return _result(command, decode(data, props.content_type))

    def call_read(
        self, queue: str, command: Command, read: Callable[[bytes], T], *, timeout: float = 30.0
    ) -> T:
        """`call`, for a reply whose body `read` checks from its msgpack bytes instead of as
        `command.RESULT` (a long reply: protos.volume_wire reads a page of volumes without a
        model per volume). `read` raises ValueError for a body the model would refuse; that
        is a DecodeError here, as in `call`. Raises as `call` otherwise (an error reply is a
        RemoteError, a reply of another type a DecodeError)."""
        props, data = self._request(queue, command, timeout, None, None, None)
        envelope, body = decode_head(data, props.content_type)
        if envelope.type != command.RESULT.TYPE:
            _result(command, decode(data, props.content_type))  # raises: not the result
            raise DecodeError(f"{command.TYPE}: no {command.RESULT.TYPE} reply")
        check_version(envelope, command.RESULT)
        try:
            return read(body)
        except ValueError as exc:
            raise DecodeError(f"invalid {envelope.type}: {exc}") from None

    def _request(  # noqa: PLR0917  (private: both callers pass every argument)
        self,
        queue: str,
        command: Command,
        timeout: float,
        message_id: str | None,
        correlation_id: str | None,
        causation_id: str | None,
        *,
        expires: bool = False,
    ) -> tuple[pika.spec.BasicProperties, bytes]:
        cause = current_cause() or Cause()
        envelope = envelope_for(
            command,
            source=self.source,
            correlation_id=correlation_id or cause.correlation_id or str(uuid.uuid4()),
            causation_id=causation_id or cause.causation_id,
            message_id=message_id,
            expires_in=timeout if expires else None,
        )
        try:
            return self._rpc.call(
                routing.COMMANDS_EXCHANGE,
                queue,
                pack(envelope),
                _rpc_properties(envelope),
                timeout,
            )
        except RpcTimeout:
            raise RpcTimeout(
                f"{command.TYPE} to {queue!r}: no reply within {timeout:g} s"
            ) from None

    # ---- subscriptions ---------------------------------------------------------------------

    def subscribe(
        self,
        patterns: Iterable[str],
        handler: Callable[[Envelope, Message], None],
        *,
        queue: str | None = None,
        prefetch: int = 100,
    ) -> Subscription:
        """Call `handler(envelope, event)` for each event matching any of `patterns`, in order,
        on a thread of the subscription's own.

        Without `queue`, a private queue is made that outlives short disconnections (it expires
        a minute after its last consumer left), so no event is lost across a reconnect.
        Events that cannot be decoded, or whose handler raises, go to the dead-letter queue
        with the reason (services.bus.inbound.dead_letter); the subscription goes on.
        """
        decl = QueueDecl(
            queue or f"subscriber.{self.source}.{uuid.uuid4().hex[:12]}",
            kind="subscriber" if queue is None else "events",
            patterns=tuple(patterns),
        )
        self.declare(decl)
        sub = Subscription(self, decl, handler, prefetch)
        sub.start()
        return sub


class Subscription:
    """A running event subscription; `close()` stops it and deletes a private queue."""

    def __init__(
        self,
        bus: Bus,
        decl: QueueDecl,
        handler: Callable[[Envelope, Message], None],
        prefetch: int,
    ) -> None:
        self.bus = bus
        self.decl = decl
        self._handler = handler
        self._inbox: queue_mod.SimpleQueue[Delivery | None] = queue_mod.SimpleQueue()
        self._consumer = Consumer(decl.name, self._inbox.put, prefetch=prefetch)
        self._thread = threading.Thread(target=self._loop, name=f"sub-{decl.name}", daemon=True)
        # Its connection opened at the first `rebind`.
        self._rebinder = Rebinder(blocking_nodes(bus.url, f"{bus.source}-rebind"))

    def start(self) -> None:
        self._thread.start()
        self.bus.link.add_consumer(self._consumer)

    def _loop(self) -> None:
        while (delivery := self._inbox.get()) is not None:
            inbound = LinkInbound(delivery, self.bus.link)
            try:
                envelope = decode(delivery.body, delivery.properties.content_type)
                event = parse_body(envelope)
            except DecodeError as exc:
                self._settle_failed(inbound, exc.reason)
                continue
            try:
                self._handler(envelope, event)
            except Exception as exc:
                log.exception("event handler failed", queue=self.decl.name)
                self._settle_failed(inbound, f"handler raised {type(exc).__name__}: {exc}")
                continue
            inbound.ack()

    @staticmethod
    def _settle_failed(inbound: LinkInbound, reason: str) -> None:
        try:
            dead_letter(inbound, reason)
        except Exception as exc:  # no confirm: leave it to the broker to deliver again
            log.warning("dead letter not confirmed; event requeued", error=str(exc))
            inbound.nack(requeue=True)

    def rebind(self, patterns: Iterable[str], *, unbind: Iterable[str] = ()) -> None:
        """Bind the queue by exactly `patterns` from now on (also after reconnections):
        new ones are bound, dropped ones and `unbind` (say, an older release's) unbound."""
        new = tuple(dict.fromkeys(patterns))
        gone = [p for p in dict.fromkeys((*self.decl.patterns, *unbind)) if p not in new]
        self.decl = replace(self.decl, patterns=new)
        self.bus.declare_only(self.decl)
        self._rebinder.rebind(self.decl, gone)

    def close(self, timeout: float = 5.0) -> None:
        self._rebinder.close()
        try:
            self.bus.link.remove_consumer(self._consumer).result(timeout)
        except (FutureTimeout, ConnectionLost):
            pass
        self._inbox.put(None)
        self._thread.join(timeout)
        if self.decl.kind == "subscriber":
            try:
                delete_queue(self.bus.link.nodes.in_order(), self.decl.name)
            except Exception:  # the queue expires by itself a minute later
                pass


def _wait(future: Confirmation, timeout: float) -> None:
    try:
        future.result(timeout)
    except FutureTimeout:
        future.cancel()
        raise ConnectionLost(
            f"broker did not confirm within {timeout:g} s (connection down?)"
        ) from None


def extra_routing_headers(event: Message) -> dict[str, Any] | None:
    """The BCC header (RabbitMQ's sender-selected distribution, stripped before delivery)
    for an event with `extra_routing_keys()`, else None."""
    keys = getattr(event, "extra_routing_keys", None)
    if not callable(keys):
        return None
    return {"BCC": list(keys())}


def _routing_key(event: Message) -> str:
    key = getattr(event, "routing_key", None)
    if not callable(key):
        raise TypeError(f"{type(event).__name__} is not an event: it has no routing_key()")
    result = key()
    assert isinstance(result, str)
    return result


def _result(command: Command, answer: Envelope) -> Message:
    body = parse_body(answer)
    if isinstance(body, ErrorReply):
        raise RemoteError(body.code, body.message, body.details)
    if not isinstance(body, command.RESULT):
        raise DecodeError(
            f"{command.TYPE} expects a {command.RESULT.TYPE} reply, got {answer.type}"
        )
    return body
