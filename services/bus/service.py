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
A command whose envelope's `expires_at` has passed when a worker takes it (its sender gave up
on it) is not run: it is dead-lettered with reason `expired`, unanswered and unrecorded, so a
resend with the same id and a fresh expiry still runs.
"""

from __future__ import annotations

import dataclasses
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pika
import pika.exceptions
import pika.spec
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from protos import routing
from protos.base import Message, lookup
from protos.codec import DecodeError, Envelope, decode, envelope_for, pack, parse_body
from protos.commands import Command
from protos.replies import Done, ErrorReply
from services.bus.bus import Bus, properties_for
from services.bus.cause import Cause, caused_by
from services.bus.errors import BusError, ServiceError
from services.bus.idempotency import IdempotencyStore, InFlight, MemoryIdempotencyStore
from services.bus.inbound import (
    ChannelInbound,
    DeadLetterChannel,
    Inbound,
    LinkInbound,
    dead_letter,
)
from services.bus.link import Consumer, Delivery
from services.bus.nodes import blocking_nodes
from services.bus.rpc import is_reply_queue
from services.bus.topology import QueueDecl

log = structlog.get_logger("flotilla.service")

F = TypeVar("F", bound=Callable[..., Any])
DEAD_LETTER_RETRY_S = 0.5  # before requeueing a message whose dead letter was refused
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


EXPIRED = "expired"  # the dead-letter reason of a command taken after its expiry


class Expired(Exception):
    """Raised by a handler (`Context.check_expiry`) that finds its command expired before it
    acted: the command is dead-lettered with reason `expired`, not answered nor recorded."""


Handler = Callable[[Any, "Context"], Message | None]


@dataclass(frozen=True)
class Context:
    """What a handler knows about the message it is handling."""

    envelope: Envelope
    redelivered: bool = False
    routing_key: str = ""

    @property
    def cause(self) -> Cause:
        """What this message causes: its correlation id, and itself as the causation."""
        return Cause.of(self.envelope)

    def check_expiry(self) -> None:
        """Raise Expired if the command's sender has given up on it (`expires_at` passed).
        A handler calls it under the lock that orders it with what the sender does next
        (e.g. the domain's lock, before a start), so that comes after it or not at all."""
        if self.envelope.expired():
            raise Expired(f"{self.envelope.type} {self.envelope.id}")


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

    Commands are taken by `concurrency` worker threads, each on a connection of its own with
    prefetch 1, and handled, answered and acked in that thread the way a hand-written pika
    consumer does it (no hand-off through the I/O thread on the hot path). Those connections
    run without AMQP heartbeats, so a handler may take as long as it needs; TCP keepalive and
    the broker's own closes end dead ones. Events are consumed through the bus's I/O thread
    and handled on `concurrency` threads (1 keeps them in order). Graceful `stop()`: finish
    the handlers under way, then cancel and close; unacked messages go back to the broker.
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
        self._in_flight = InFlight()
        self._commands = service.command_handlers()
        self._events = service.event_handlers()
        self._prefetch = prefetch
        self._concurrency = concurrency
        self._consumers: list[tuple[Consumer, queue_mod.SimpleQueue[Delivery | None]]] = []
        self._workers: list[threading.Thread] = []
        self._stopped = threading.Event()
        # Command workers' connections and channels, for stop() to end their consuming.
        self._consuming: list[tuple[pika.BlockingConnection, BlockingChannel]] = []
        self._consuming_lock = threading.Lock()

    def start(self) -> ServiceRunner:
        if self._commands:
            if not self.queue:
                raise ValueError(f"{type(self.service).__name__} handles commands: give a queue")
            self.bus.declare(QueueDecl(self.queue))
            connected = threading.Barrier(self._concurrency + 1)
            for i in range(self._concurrency):
                worker = threading.Thread(
                    target=self._command_worker,
                    args=(self.queue, connected),
                    name=f"{self.queue}-{i}",
                    daemon=True,
                )
                worker.start()
                self._workers.append(worker)
            try:
                connected.wait(30.0)  # consuming before start() returns
            except threading.BrokenBarrierError:
                log.warning("command workers not all connected yet", queue=self.queue)
        if self._events:
            name = routing.service_event_queue(self.service.name or type(self.service).__name__)
            patterns = tuple(sorted({p for p, _ in self._events}))
            self.bus.declare(QueueDecl(name, kind="events", patterns=patterns))
            self._consume_events(name)
        return self

    def _command_worker(self, queue: str, connected: threading.Barrier) -> None:
        nodes = blocking_nodes(self.bus.url, f"{self.bus.source}-{queue}")
        backoff = 0.1
        while not self._stopped.is_set():
            try:
                # The first node that answers, starting after the one whose connection was lost.
                connection, params = nodes.connect()
            except pika.exceptions.AMQPError as exc:
                log.warning("command consumer cannot connect", error=str(exc))
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            try:
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1)
                dead = DeadLetterChannel(connection)

                def on_message(
                    ch: BlockingChannel,
                    method: pika.spec.Basic.Deliver,
                    props: pika.spec.BasicProperties,
                    body: bytes,
                    dead_letters: DeadLetterChannel = dead,
                ) -> None:
                    inbound = ChannelInbound(
                        ch,
                        dead_letters,
                        method.delivery_tag,
                        body,
                        props,
                        method.redelivered,
                        method.routing_key,
                        queue,
                    )
                    self._handle(inbound, self._handle_command)

                channel.basic_consume(queue, on_message)
                if not connected.broken:
                    try:
                        connected.wait(0)
                    except threading.BrokenBarrierError:
                        pass
                with self._consuming_lock:
                    self._consuming.append((connection, channel))
                if not self._stopped.is_set():
                    # Blocks in the I/O wait with no per-message timer; stop() ends it from
                    # another thread through add_callback_threadsafe.
                    channel.start_consuming()
            except pika.exceptions.AMQPError as exc:
                log.warning("command consumer lost its connection", error=str(exc))
                nodes.failed(params)
                self._stopped.wait(backoff)
            finally:
                with self._consuming_lock:
                    self._consuming = [c for c in self._consuming if c[0] is not connection]
                try:
                    if connection.is_open:
                        connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _consume_events(self, queue: str) -> None:
        inbox: queue_mod.SimpleQueue[Delivery | None] = queue_mod.SimpleQueue()
        consumer = Consumer(queue, inbox.put, prefetch=self._prefetch)
        self._consumers.append((consumer, inbox))
        for i in range(self._concurrency):
            worker = threading.Thread(
                target=self._event_worker, args=(inbox,), name=f"{queue}-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        self.bus.link.add_consumer(consumer)

    def _event_worker(self, inbox: queue_mod.SimpleQueue[Delivery | None]) -> None:
        while (delivery := inbox.get()) is not None:
            self._handle(LinkInbound(delivery, self.bus.link), self._handle_event)

    @staticmethod
    def _handle(inbound: Inbound, handle: Callable[[Inbound], None]) -> None:
        structlog.contextvars.clear_contextvars()
        try:
            handle(inbound)
        except (BusError, pika.exceptions.AMQPError) as exc:
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
        with self._consuming_lock:
            consuming = list(self._consuming)
        for connection, channel in consuming:
            try:
                connection.add_callback_threadsafe(channel.stop_consuming)
            except Exception:  # that connection is already gone
                log.debug("command consumer already stopped")
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

    def _handle_command(self, delivery: Inbound) -> None:
        props = delivery.properties
        try:
            envelope = decode(delivery.body, props.content_type)
        except DecodeError as exc:
            self._dead_letter(delivery, exc.reason)
            return
        structlog.contextvars.bind_contextvars(
            message_id=envelope.id, correlation_id=envelope.correlation_id, type=envelope.type
        )
        if props.reply_to and not is_reply_queue(props.reply_to):
            # A reply goes through the default exchange to the queue named: only a caller's
            # own reply queue may be named, never a service's queue.
            self._dead_letter(delivery, f"reply_to {props.reply_to!r} is not a reply queue")
            return
        model = lookup(envelope.type)
        if model is not None and issubclass(model, Command) and model.READ_ONLY:
            if not self._expired(delivery, envelope):
                self._execute(delivery, envelope, record=False)  # nothing to run only once
            return
        if self._answered(delivery, envelope):
            return
        # A copy of this command may be running on another worker: wait for it, then answer
        # from its record; a message id executes once.
        with self._in_flight.claim(envelope.id) as waited:
            if waited and self._answered(delivery, envelope):
                return
            if not self._expired(delivery, envelope):
                self._execute(delivery, envelope)

    def _expired(self, delivery: Inbound, envelope: Envelope) -> bool:
        """Dead-letter a command its sender gave up on; True if it was one. Not answered (a
        resend with the same id may be waiting for the real answer) and not recorded."""
        if not envelope.expired():
            return False
        log.warning("expired command not run", expires_at=envelope.expires_at)
        self._dead_letter(delivery, EXPIRED)
        return True

    def _answered(self, delivery: Inbound, envelope: Envelope) -> bool:
        """Answer a command already executed from its record; False if there is none."""
        cached = self.idempotency.get(envelope.id)
        if cached is None:
            return False
        log.info("duplicate command answered from its record")
        delivery.ack()  # before the reply: see _answer
        self._reply(delivery, decode(cached), envelope)
        return True

    def _execute(self, delivery: Inbound, envelope: Envelope, *, record: bool = True) -> None:
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
            with caused_by(ctx.cause):
                reply = dispatch(self.service, command, ctx, self._commands)
        except Retry as exc:
            log.warning("command requeued", reason=str(exc))
            delivery.nack(requeue=True)
            return
        except Expired:
            log.warning("command expired before it acted", expires_at=envelope.expires_at)
            self._dead_letter(delivery, EXPIRED)
            return
        except Exception as exc:
            log.exception("command handler failed")
            reason = f"handler raised {type(exc).__name__}: {exc}"
            self._answer(delivery, envelope, ErrorReply(code="internal", message=reason))
            self._dead_letter(delivery, reason)
            return
        self._answer(delivery, envelope, reply, ack=True, record=record)

    def _reject(self, delivery: Inbound, envelope: Envelope, reason: str) -> None:
        self._answer(delivery, envelope, ErrorReply(code="invalid", message=reason))
        self._dead_letter(delivery, reason)

    def _answer(
        self,
        delivery: Inbound,
        request: Envelope,
        reply: Message,
        *,
        ack: bool = False,
        record: bool = True,
    ) -> None:
        reply_env = envelope_for(
            reply,
            source=self.bus.source,
            correlation_id=request.correlation_id,
            causation_id=request.id,
        )
        if record:
            self.idempotency.put(request.id, pack(reply_env))
        # Recorded, the command is done: ack it before replying. A reply to a caller whose
        # broker node died (a direct reply-to address there) makes RabbitMQ close this
        # connection; acked first, the copy is not redelivered to fail the same way forever,
        # and the caller, resending on a live node, gets the recorded answer.
        if ack:
            delivery.ack()
        self._reply(delivery, reply_env, request)

    @staticmethod
    def _reply(delivery: Inbound, reply: Envelope, request: Envelope) -> None:
        reply_to = delivery.properties.reply_to
        if not reply_to:
            return
        # A recorded reply is re-addressed to this request: its chain in the envelope, and as
        # AMQP correlation_id what the caller matches replies by (its request's property).
        reply = dataclasses.replace(reply, correlation_id=request.correlation_id)
        props = properties_for(reply, persistent=False)
        props.correlation_id = delivery.properties.correlation_id or reply.correlation_id
        delivery.reply(reply_to, pack(reply), props)

    @staticmethod
    def _dead_letter(delivery: Inbound, reason: str) -> None:
        try:
            dead_letter(delivery, reason)
        except (BusError, pika.exceptions.AMQPError) as exc:
            # Not confirmed: hand the message back rather than hold it unacked (a command
            # worker takes one at a time, so an unacked one would stop it for good). The
            # pause keeps a broker that refuses for a while from being asked in a tight loop.
            log.warning("dead letter not confirmed; message requeued", error=str(exc))
            time.sleep(DEAD_LETTER_RETRY_S)
            delivery.nack(requeue=True)

    # ---- events ------------------------------------------------------------------------------

    def _handle_event(self, delivery: Inbound) -> None:
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
                with caused_by(ctx.cause):
                    handler(event, ctx)
            except Retry:
                delivery.nack(requeue=True)
                return
            except Exception as exc:
                log.exception("event handler failed")
                self._dead_letter(delivery, f"handler raised {type(exc).__name__}: {exc}")
                return
        delivery.ack()
