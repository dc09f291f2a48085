"""The consumer runtime: services whose methods handle commands and events.

    class Compute(Service):
        name = "compute"

        @handles(StartDomain)
        def start(self, cmd: StartDomain, ctx: Context) -> DomainInfo: ...

        @on_event("host.heartbeat.*")
        def heartbeat(self, event: HostHeartbeat, ctx: Context) -> None: ...

The decorators only attach metadata and return the method unchanged, so a handler is a plain
method a unit test calls directly (or through `dispatch`). `ServiceRunner` consumes the queues,
decodes, dispatches, replies, records idempotency and acks after the handler succeeded.
Undecodable or invalid messages, and commands whose handler failed unexpectedly, go to the
dead-letter exchange with the reason in the `x-flotilla-reason` header; the runner keeps going.
"""

from __future__ import annotations

import dataclasses
import queue as queue_mod
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import structlog

from protos import routing
from protos.base import Message
from protos.codec import DecodeError, Envelope, decode, envelope_for, pack, parse_body
from protos.commands import Command
from protos.replies import Done, ErrorReply
from services.bus.bus import Bus, properties_for
from services.bus.errors import BusError, ServiceError
from services.bus.idempotency import IdempotencyStore, MemoryIdempotencyStore
from services.bus.link import Consumer, Delivery
from services.bus.topology import QueueDecl

log = structlog.get_logger("flotilla.service")

F = TypeVar("F", bound=Callable[..., Any])
_HANDLES = "__flotilla_handles__"
_EVENTS = "__flotilla_events__"


def handles(command: type[Command]) -> Callable[[F], F]:
    """Register the decorated method as the handler of `command` (metadata only)."""

    def register(fn: F) -> F:
        setattr(fn, _HANDLES, command)
        return fn

    return register


def on_event(*patterns: str) -> Callable[[F], F]:
    """Register the decorated method for events whose routing key matches a pattern."""

    def register(fn: F) -> F:
        setattr(fn, _EVENTS, patterns)
        return fn

    return register


class Retry(Exception):
    """Raised by a handler for a transient failure: the message is requeued, not answered."""


Handler = Callable[[Any, "Context"], Message | None]


@dataclass(frozen=True)
class Context:
    """What a handler knows about the message it is handling."""

    envelope: Envelope
    redelivered: bool = False
    routing_key: str = ""


class Service:
    """Base class for a service; `name` names its event queue (`<name>.events`)."""

    name: ClassVar[str] = ""

    def command_handlers(self) -> dict[type[Command], Handler]:
        found: dict[type[Command], Handler] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            command = getattr(fn, _HANDLES, None)
            if command is not None:
                if command in found:
                    raise TypeError(f"two handlers for {command.__name__}")
                found[command] = getattr(self, attr)
        return found

    def event_handlers(self) -> list[tuple[str, Callable[[Any, Context], None]]]:
        found: list[tuple[str, Callable[[Any, Context], None]]] = []
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            found.extend((pattern, getattr(self, attr)) for pattern in getattr(fn, _EVENTS, ()))
        return found


def dispatch(
    service: Service,
    command: Message,
    ctx: Context,
    handlers: dict[type[Command], Handler] | None = None,
) -> Message:
    """Run the handler for `command` and return the reply: its result, `Done` or an
    `ErrorReply`. ServiceError becomes an error reply; other exceptions propagate.
    `handlers` is `service.command_handlers()`, passed in by callers that cached it."""
    table = service.command_handlers() if handlers is None else handlers
    handler = table.get(type(command))  # type: ignore[arg-type]
    if handler is None:
        return ErrorReply(code="invalid", message=f"no handler for {command.TYPE}")
    try:
        result = handler(command, ctx)
    except ServiceError as exc:
        return ErrorReply(code=exc.code, message=exc.message, details=exc.details)
    return Done() if result is None else result


class ServiceRunner:
    """Consumes a service's command queue and event queue on worker threads.

    `concurrency` worker threads per queue (1 keeps messages in order). Graceful `stop()`:
    cancel the consumers, finish the handlers under way, leave prefetched messages to the broker.
    """

    def __init__(
        self,
        bus: Bus,
        service: Service,
        *,
        queue: str | None = None,
        idempotency: IdempotencyStore | None = None,
        prefetch: int = 32,
        concurrency: int = 1,
    ) -> None:
        self.bus = bus
        self.service = service
        self.queue = queue
        self.idempotency = idempotency or MemoryIdempotencyStore()
        self._commands = service.command_handlers()
        self._events = service.event_handlers()
        self._prefetch = prefetch
        self._concurrency = concurrency
        self._consumers: list[tuple[Consumer, queue_mod.SimpleQueue[Delivery | None]]] = []
        self._workers: list[threading.Thread] = []
        self._stopped = threading.Event()

    def start(self) -> ServiceRunner:
        if self._commands:
            if not self.queue:
                raise ValueError(f"{type(self.service).__name__} handles commands: give a queue")
            self.bus.declare(QueueDecl(self.queue))
            self._consume(self.queue, self._handle_command)
        if self._events:
            name = routing.service_event_queue(self.service.name or type(self.service).__name__)
            patterns = tuple(sorted({p for p, _ in self._events}))
            self.bus.declare(QueueDecl(name, kind="events", patterns=patterns))
            self._consume(name, self._handle_event)
        return self

    def _consume(self, queue: str, handle: Callable[[Delivery], None]) -> None:
        inbox: queue_mod.SimpleQueue[Delivery | None] = queue_mod.SimpleQueue()
        consumer = Consumer(queue, inbox.put, prefetch=self._prefetch)
        self._consumers.append((consumer, inbox))
        for i in range(self._concurrency):
            worker = threading.Thread(
                target=self._work, args=(inbox, handle), name=f"{queue}-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        self.bus.link.add_consumer(consumer)

    def _work(
        self, inbox: queue_mod.SimpleQueue[Delivery | None], handle: Callable[[Delivery], None]
    ) -> None:
        while (delivery := inbox.get()) is not None:
            structlog.contextvars.clear_contextvars()
            try:
                handle(delivery)
            except BusError as exc:
                # Could not reply or dead-letter: leave the message unacked for redelivery.
                log.warning("delivery left for redelivery", error=str(exc))
            except Exception:
                log.exception("delivery handling failed")
            finally:
                structlog.contextvars.clear_contextvars()

    def stop(self, timeout: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for consumer, _ in self._consumers:
            try:
                self.bus.link.remove_consumer(consumer).result(timeout)
            except Exception:  # already gone with the connection
                log.debug("consumer cancel skipped", queue=consumer.queue)
        for _, inbox in self._consumers:
            for _ in range(self._concurrency):
                inbox.put(None)
        for worker in self._workers:
            worker.join(timeout)

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully. Call from the main thread."""
        done = threading.Event()

        def on_signal(_signo: int, _frame: object) -> None:
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not done.wait(1.0):
                pass
        finally:
            for signo, handler in previous.items():
                signal.signal(signo, handler)
            self.stop()

    # ---- commands ----------------------------------------------------------------------------

    def _handle_command(self, delivery: Delivery) -> None:
        props = delivery.properties
        try:
            envelope = decode(delivery.body, props.content_type)
        except DecodeError as exc:
            self._dead_letter(delivery, exc.reason)
            return
        structlog.contextvars.bind_contextvars(
            message_id=envelope.id, correlation_id=envelope.correlation_id, type=envelope.type
        )
        cached = self.idempotency.get(envelope.id)
        if cached is not None:
            log.info("duplicate command answered from its record")
            self._reply(props.reply_to, decode(cached), envelope)
            self.bus.link.ack(delivery)
            return
        try:
            command = parse_body(envelope)
        except DecodeError as exc:
            self._reject(delivery, envelope, exc.reason)
            return
        if type(command) not in self._commands:
            self._reject(
                delivery, envelope, f"{envelope.type} is not a command this service handles"
            )
            return
        domain_id = getattr(command, "domain_id", None)
        if domain_id is not None:
            structlog.contextvars.bind_contextvars(domain_id=str(domain_id))
        ctx = Context(envelope, redelivered=delivery.redelivered, routing_key=delivery.routing_key)
        try:
            reply = dispatch(self.service, command, ctx, self._commands)
        except Retry as exc:
            log.warning("command requeued", reason=str(exc))
            self.bus.link.nack(delivery, requeue=True)
            return
        except Exception as exc:
            log.exception("command handler failed")
            reason = f"handler raised {type(exc).__name__}: {exc}"
            self._answer(delivery, envelope, ErrorReply(code="internal", message=reason))
            self._dead_letter(delivery, reason)
            return
        self._answer(delivery, envelope, reply, ack=True)

    def _reject(self, delivery: Delivery, envelope: Envelope, reason: str) -> None:
        self._answer(delivery, envelope, ErrorReply(code="invalid", message=reason))
        self._dead_letter(delivery, reason)

    def _answer(
        self, delivery: Delivery, request: Envelope, reply: Message, *, ack: bool = False
    ) -> None:
        reply_env = envelope_for(
            reply,
            source=self.bus.source,
            correlation_id=request.correlation_id,
            causation_id=request.id,
        )
        self.idempotency.put(request.id, pack(reply_env))
        self._reply(delivery.properties.reply_to, reply_env, request)
        if ack:
            self.bus.link.ack(delivery)

    def _reply(self, reply_to: str | None, reply: Envelope, request: Envelope) -> None:
        if not reply_to:
            return
        # A recorded reply is re-addressed to this request's correlation id.
        reply = dataclasses.replace(reply, correlation_id=request.correlation_id)
        props = properties_for(reply, persistent=False)
        self.bus.link.publish_unconfirmed("", reply_to, pack(reply), props)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the delivery to the dead-letter exchange with `reason`, then ack it."""
        log.warning("message dead-lettered", reason=reason, queue=delivery.consumer.queue)
        props = delivery.properties
        headers = dict(props.headers or {})
        headers[routing.REASON_HEADER] = reason[:1000]
        headers[routing.QUEUE_HEADER] = delivery.consumer.queue
        props.headers = headers
        future = self.bus.link.publish(
            routing.DEAD_EXCHANGE, delivery.consumer.queue, delivery.body, props
        )
        future.result(30.0)  # nothing is lost: ack only once the dead letter is confirmed
        self.bus.link.ack(delivery)

    # ---- events ------------------------------------------------------------------------------

    def _handle_event(self, delivery: Delivery) -> None:
        try:
            envelope = decode(delivery.body, delivery.properties.content_type)
            event = parse_body(envelope)
        except DecodeError as exc:
            self._dead_letter(delivery, exc.reason)
            return
        structlog.contextvars.bind_contextvars(message_id=envelope.id, type=envelope.type)
        ctx = Context(envelope, redelivered=delivery.redelivered, routing_key=delivery.routing_key)
        for pattern, handler in self._events:
            if not routing.topic_matches(pattern, delivery.routing_key):
                continue
            try:
                handler(event, ctx)
            except Retry:
                self.bus.link.nack(delivery, requeue=True)
                return
            except Exception as exc:
                log.exception("event handler failed")
                self._dead_letter(delivery, f"handler raised {type(exc).__name__}: {exc}")
                return
        self.bus.link.ack(delivery)
