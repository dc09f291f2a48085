"""One AMQP connection driven by pika's SelectConnection on a dedicated I/O thread.

pika is touched only under the I/O lock, which that thread holds whenever it is not waiting
in epoll (services.bus.batching.LockedIOLoop). Other threads hand it operations through a
queue and one coalesced wake-up (`add_callback_threadsafe`); a publish that finds the thread
waiting (the lock free) and nothing queued before it is sent by its own thread instead, under
the lock, so its bytes leave without a thread wake-up on the way (one costs ~0.3-1 ms on a
busy two-core host). Publishing is pipelined with
publisher confirms: `publish` returns a Future settled by the broker's ack (or nack, or the
basic.return of an unroutable mandatory message). Consumers get their own channel and prefetch.

When the connection goes away the thread fails every unconfirmed publish with
`ConnectionLost`, tells its listeners (the RPC client fails in-flight calls at once), and
reconnects with capped exponential backoff, redeclaring the topology and restarting every
consumer. With several broker nodes (services.bus.nodes) it reconnects to the next node in the
list at once and backs off only after a whole round of nodes failed. Deliveries received on an
older connection can no longer be acked: the broker redelivers them, and idempotent handlers
make that harmless.

A publish channel the broker keeps refusing is replaced: RabbitMQ 3.10 ties a channel's first
route to a quorum queue to the leader the queue's record names at that moment, and if that node
is dead (the queue is electing a new leader right after a node died) it nacks every later
publish on that channel to that queue, for as long as the channel lives; a new channel is
accepted once the election is over. So after a nack the channel is closed and a new one opened
(at most once per PUB_RENEW_INTERVAL_S); publishes still unconfirmed on the old one fail with
ConnectionLost (the caller resends), and publishes made meanwhile wait for the new one.
"""

from __future__ import annotations

import collections
import contextlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
import structlog

from services.bus.batching import BatchingConnection, LockedIOLoop
from services.bus.confirm import Confirmation
from services.bus.errors import ConnectionLost, NoRouteError, PublishNacked
from services.bus.nodes import NodeList
from services.bus.topology import QueueDecl, declare

# A publish goes out on its caller's thread only while the link is nearly idle: with more
# unconfirmed than this, publishes are a stream, which the I/O thread writes in batches.
DIRECT_MAX_UNCONFIRMED = 16
log = structlog.get_logger("flotilla.bus")

MAX_BACKOFF_S = 5.0
DEFAULT_HEARTBEAT_S = 10
# A nacked publish replaces the publish channel, at most this often (a queue that refuses for
# another reason, e.g. full with reject-publish, must not make the link churn channels).
PUB_RENEW_INTERVAL_S = 1.0


@dataclass(eq=False)
class Consumer:
    """A queue consumer. `on_delivery` runs on the I/O thread and must only hand off."""

    queue: str
    on_delivery: Callable[[Delivery], None]
    prefetch: int = 32
    channel: pika.channel.Channel | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    generation: int
    tag: int
    body: bytes
    properties: pika.spec.BasicProperties
    exchange: str
    routing_key: str
    redelivered: bool
    consumer: Consumer


@dataclass(slots=True)
class _Publish:
    future: Confirmation
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.spec.BasicProperties
    mandatory: bool


class Link:
    """The connection, its channels and the I/O thread; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        declarations: Callable[[], list[QueueDecl]],
    ) -> None:
        def configure(params: pika.URLParameters) -> None:
            if "heartbeat" not in url:
                params.heartbeat = DEFAULT_HEARTBEAT_S
            params.connection_attempts = 1
            params.client_properties = {"connection_name": name}

        self.nodes = NodeList(url, configure)
        self._declarations = declarations
        self.name = name

        self._lock = threading.Lock()
        # Held by the I/O thread but while it waits in epoll; guards everything pika.
        self._io_lock = threading.Lock()
        self.sent_directly = 0  # publishes sent by their caller's thread
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_pending = False
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.disconnect_listeners: list[Callable[[], None]] = []

        # Owned by the I/O thread.
        self._conn: BatchingConnection | None = None
        self._pub: pika.channel.Channel | None = None
        self._plain: pika.channel.Channel | None = None
        self._generation = 0
        self._next_tag = 1
        self._unconfirmed: dict[int, tuple[Confirmation, str, str, str | None]] = {}
        self._returned: set[str] = set()
        self._pub_opened = 0.0  # monotonic time the publish channel was opened
        self._renewing = False  # a replacement publish channel is being opened
        self._renew_scheduled = False
        self._held: list[_Publish] = []  # publishes waiting for the replacement channel
        self._consumers: list[Consumer] = []
        self._starting_consumers = 0
        # remove_consumer Futures waiting for their channel to close, settled if the
        # connection is lost first (guarded by _lock).
        self._removals: set[Future[None]] = set()
        self.connections_made = 0
        # Wall clock of the last (re)declaration of this link's queues (0 before the first).
        self.declared_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the I/O thread and wait until connected; raise ConnectionLost on timeout."""
        self._thread = threading.Thread(target=self._run, name=f"amqp-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise ConnectionLost(f"could not connect to the broker within {timeout:.0f} s")

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the thread; pending publishes fail."""
        self._stopping.set()
        self._submit(self._close_connection)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def params(self) -> pika.URLParameters:
        """The node connected to now (or tried next)."""
        return self.nodes.first

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    # ---- operations from any thread ----------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.spec.BasicProperties,
        *,
        mandatory: bool = False,
    ) -> Confirmation:
        """Publish on the confirm channel; the Future settles on the broker's confirm.

        The Future raises NoRouteError (mandatory and unroutable), PublishNacked or
        ConnectionLost. While disconnected, the publish waits for the next connection; a
        caller that stops waiting should `cancel()` the Future so it is not sent later.
        """
        future = Confirmation()
        publish = _Publish(future, exchange, routing_key, body, properties, mandatory)

        def op() -> None:
            if future.set_running_or_notify_cancel():
                self._send(publish)

        if not self._direct(op):
            self._submit(op)
        return future

    def _direct(self, op: Callable[[], None]) -> bool:
        """Runs `op` on this thread if the I/O thread is waiting in epoll (its lock free) on
        an open connection with nothing queued before it; False if it must be queued."""
        if not self._io_lock.acquire(blocking=False):
            return False
        try:
            with self._lock:
                if self._ops or self._wake_pending or self._conn is None:
                    return False
                if not self._ready.is_set():
                    return False
            if len(self._unconfirmed) > DIRECT_MAX_UNCONFIRMED:
                return False  # a stream of publishes: the I/O thread batches them better
            self.sent_directly += 1
            try:
                op()
            except Exception:  # as the I/O thread's `_drain` treats a failing operation
                log.exception("bus operation failed")
            return True
        finally:
            self._io_lock.release()

    def _send(self, publish: _Publish) -> None:
        if self._renewing:
            self._held.append(publish)
            return
        if self._pub is None or not self._pub.is_open:
            publish.future.set_exception(ConnectionLost("publish channel is not open"))
            return
        tag = self._next_tag
        self._next_tag += 1
        message_id = publish.properties.message_id or ""
        p = publish
        self._unconfirmed[tag] = (p.future, p.exchange, p.routing_key, message_id)
        self._pub.basic_publish(p.exchange, p.routing_key, p.body, p.properties, p.mandatory)

    def publish_unconfirmed(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.spec.BasicProperties,
    ) -> Confirmation:
        """Publish on a channel without publisher confirms (RPC replies: a direct reply-to
        pseudo-queue, which confirms cannot make any safer, and which a confirm channel
        would delay). The Future settles once the frame is handed to the socket."""
        future = Confirmation()

        def op() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self._plain is None or not self._plain.is_open:
                future.set_exception(ConnectionLost("channel is not open"))
                return
            self._plain.basic_publish(exchange, routing_key, body, properties)
            future.set_result(None)

        if not self._direct(op):
            self._submit(op)
        return future

    def add_consumer(self, consumer: Consumer) -> None:
        """Start consuming (now if connected, and again after every reconnection)."""

        def op() -> None:
            self._consumers.append(consumer)
            if self._conn is not None and self._conn.is_open:
                self._open_consumer(consumer)

        self._submit(op)

    def remove_consumer(self, consumer: Consumer) -> Future[None]:
        """Cancel the consumer; the Future settles once its channel is closed, or as soon as
        no connection is open (now, or when the connection is lost first): the broker has
        then ended the channel and requeued what it had not acked. The removal itself runs
        once a connection is back (the consumer may take deliveries until then, which go back
        to the broker when its channel closes) or when the link closes."""
        done: Future[None] = Future()

        def settle() -> None:
            with self._lock:
                self._removals.discard(done)
            if not done.done():
                with contextlib.suppress(InvalidStateError):
                    done.set_result(None)

        def op() -> None:
            if consumer in self._consumers:
                self._consumers.remove(consumer)
            ch, consumer.channel = consumer.channel, None
            if ch is not None and ch.is_open:
                ch.add_on_close_callback(lambda *_: settle())
                ch.close()
            else:
                settle()

        with self._lock:
            down = not self._ready.is_set()
            if not down:
                self._removals.add(done)
        self._submit(op)
        if down:
            settle()
        return done

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, ack=True, requeue=False)

    def nack(self, delivery: Delivery, *, requeue: bool) -> None:
        self._settle(delivery, ack=False, requeue=requeue)

    def _settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
        def op() -> None:
            ch = delivery.consumer.channel
            # A delivery from an older connection or channel cannot be settled; the broker
            # already requeued it when that channel went away.
            if delivery.generation != self._generation or ch is None or not ch.is_open:
                return
            if ack:
                ch.basic_ack(delivery.tag)
            else:
                ch.basic_nack(delivery.tag, requeue=requeue)

        self._submit(op)

    def _submit(self, op: Callable[[], None]) -> None:
        with self._lock:
            self._ops.append(op)
            if self._wake_pending or not self._ready.is_set() or self._conn is None:
                return
            self._wake_pending = True
            conn = self._conn
        try:
            conn.ioloop.add_callback_threadsafe(self._drain)
        except Exception:  # the loop is closing: the ops run after the next connection
            with self._lock:
                self._wake_pending = False

    def _drain(self) -> None:
        with self._lock:
            self._wake_pending = False
            ops, self._ops = self._ops, collections.deque()
        conn = self._conn
        if conn is not None:
            conn.begin_batch()  # the frames of all these operations go out in one write
        try:
            for op in ops:
                try:
                    op()
                except Exception:
                    log.exception("bus operation failed")
        finally:
            if conn is not None:
                conn.flush_batch()

    # ---- the I/O thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with self._io_lock:  # let go of only while waiting in epoll (LockedIOLoop)
            self._run_locked()

    def _declare(self, params: pika.URLParameters) -> None:
        # On the node the connection goes to, so a classic queue is made there.
        declare(params, self._declarations())
        # A transient queue whose node died is made anew, empty: what was published to it
        # before this moment never reaches its subscriber.
        self.declared_at = time.time()

    def _run_locked(self) -> None:
        backoff = 0.1
        failures = 0  # in a row; a full round of nodes failing backs off
        while not self._stopping.is_set():
            params = self.nodes.first
            try:
                self._declare(params)
            except Exception as exc:  # node down, refused, or a declaration conflict
                self.nodes.failed(params)
                failures += 1
                if failures % len(self.nodes) == 0:
                    log.warning("broker unreachable", error=str(exc), retry_in_s=round(backoff, 2))
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                else:
                    log.warning("broker node unreachable, trying the next", error=str(exc))
                continue
            conn = BatchingConnection(
                params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_close,
                custom_ioloop=LockedIOLoop(self._io_lock),
            )
            with self._lock:
                self._conn = conn
            conn.ioloop.start()
            was_ready = self._ready.is_set()
            with self._lock:
                self._ready.clear()
                self._conn = None
                self._wake_pending = False
                removals, self._removals = self._removals, set()
            # Its epoll and wake-up socketpair go now, not when the collector finds the loop.
            conn.ioloop.close()
            for removal in removals:  # their channels went with the connection
                if not removal.done():
                    with contextlib.suppress(InvalidStateError):
                        removal.set_result(None)
            self._fail_unconfirmed()
            # The next attempt goes to the next node: this one may well be gone.
            self.nodes.failed(params)
            if was_ready:
                backoff = 0.1
                failures = 0
                for listener in self.disconnect_listeners:
                    listener()
            else:
                failures += 1
            if not self._stopping.is_set() and (failures % len(self.nodes) == 0 or was_ready):
                delay = backoff * (0.5 + random.random())
                self._stopping.wait(delay)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        # Whatever is still queued will never run: fail publishes instead of leaving them hang.
        with self._lock:
            ops, self._ops = self._ops, collections.deque()
        self._pub = None
        self._plain = None
        for op in ops:
            try:
                op()
            except Exception:
                log.debug("dropped operation after close")

    def _on_open(self, conn: pika.SelectConnection) -> None:
        if self._stopping.is_set():
            conn.close()
            return
        conn.channel(on_open_callback=self._on_pub_channel)

    def _on_open_error(self, conn: pika.SelectConnection, error: BaseException | str) -> None:
        log.warning("broker connection failed", error=str(error))
        conn.ioloop.stop()

    def _on_close(self, conn: pika.SelectConnection, reason: BaseException) -> None:
        if not self._stopping.is_set():
            log.warning("broker connection lost", reason=str(reason))
        conn.ioloop.stop()

    def _on_pub_channel(self, ch: pika.channel.Channel) -> None:
        self._pub_channel_opened(ch, then=self._on_confirm_mode)

    def _pub_channel_opened(
        self, ch: pika.channel.Channel, *, then: Callable[[pika.channel.Channel], None]
    ) -> None:
        self._pub = ch
        self._next_tag = 1
        self._pub_opened = time.monotonic()
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(self._on_return)
        ch.confirm_delivery(partial(self._on_confirm, ch), callback=lambda _f: then(ch))

    def _on_confirm_mode(self, _ch: pika.channel.Channel) -> None:
        self._open_channel(self._on_plain_channel)

    def _open_channel(self, on_open: Callable[[pika.channel.Channel], None]) -> None:
        """Open a channel for a step of the connection's set-up, unless the connection is
        closing or gone: a cut mid-setup, after which `_run` reconnects and starts the
        set-up over, so the step is simply dropped."""
        conn = self._conn
        if conn is None or not conn.is_open:
            log.debug("set-up step dropped: the connection is closing")
            return
        conn.channel(on_open_callback=on_open)

    def _renew_pub_channel(self) -> None:
        """Replace the publish channel after a nack (see the module docstring)."""
        conn = self._conn
        if self._renewing or self._renew_scheduled or conn is None or not conn.is_open:
            return
        wait = self._pub_opened + PUB_RENEW_INTERVAL_S - time.monotonic()
        if wait > 0:
            self._renew_scheduled = True

            def later() -> None:
                self._renew_scheduled = False
                if self._conn is conn:
                    self._renew_pub_channel()

            conn.ioloop.call_later(wait, later)
            return
        log.warning("publish channel refused by the broker; replacing it")
        old, self._pub = self._pub, None
        self._renewing = True
        pending, self._unconfirmed = self._unconfirmed, {}
        if old is not None and old.is_open:
            old.close()
        for future, *_ in pending.values():
            future.set_exception(
                ConnectionLost("publish channel replaced before the broker confirmed")
            )
        conn.channel(
            on_open_callback=partial(self._pub_channel_opened, then=self._on_pub_channel_renewed)
        )

    def _on_pub_channel_renewed(self, _ch: pika.channel.Channel) -> None:
        self._renewing = False
        held, self._held = self._held, []
        for publish in held:
            self._send(publish)

    def _on_plain_channel(self, ch: pika.channel.Channel) -> None:
        self._plain = ch
        ch.add_on_close_callback(self._on_channel_closed)
        self._start_consumers()

    def _start_consumers(self) -> None:
        self._generation += 1
        self.connections_made += 1
        self._starting_consumers = len(self._consumers)
        if not self._consumers:
            self._became_ready()
        for consumer in self._consumers:
            self._open_consumer(consumer)

    def _open_consumer(self, consumer: Consumer) -> None:

        def on_open(ch: pika.channel.Channel) -> None:
            consumer.channel = ch
            ch.add_on_close_callback(self._on_channel_closed)
            ch.basic_qos(prefetch_count=consumer.prefetch, callback=lambda _f: consume(ch))

        def consume(ch: pika.channel.Channel) -> None:
            if not ch.is_open:  # closed (or its connection cut) since: set up again later
                return
            generation = self._generation

            def on_message(
                _ch: pika.channel.Channel,
                method: pika.spec.Basic.Deliver,
                props: pika.spec.BasicProperties,
                body: bytes,
            ) -> None:
                consumer.on_delivery(
                    Delivery(
                        generation=generation,
                        tag=method.delivery_tag,
                        body=body,
                        properties=props,
                        exchange=method.exchange,
                        routing_key=method.routing_key,
                        redelivered=method.redelivered,
                        consumer=consumer,
                    )
                )

            ch.basic_consume(consumer.queue, on_message, callback=lambda _f: consumed())

        def consumed() -> None:
            if not self._ready.is_set():
                self._starting_consumers -= 1
                if self._starting_consumers <= 0:
                    self._became_ready()

        self._open_channel(on_open)

    def _became_ready(self) -> None:
        with self._lock:
            self._ready.set()
        self._drain()

    def _on_channel_closed(self, ch: pika.channel.Channel, reason: BaseException) -> None:
        if self._stopping.is_set() or not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return
        # A broker-closed channel (deleted queue, precondition failure) leaves state we cannot
        # trust; start over on a fresh connection.
        log.warning("channel closed by broker", channel=ch.channel_number, reason=str(reason))
        if self._conn is not None and self._conn.is_open:
            self._conn.close()

    def _on_return(
        self,
        _ch: pika.channel.Channel,
        _method: pika.spec.Basic.Return,
        props: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        if props.message_id:
            self._returned.add(props.message_id)

    def _on_confirm(self, ch: pika.channel.Channel, frame: pika.frame.Method[Any]) -> None:
        if ch is not self._pub:
            return  # a replaced channel's late confirm: its publishes were failed already
        method = frame.method
        tag: int = method.delivery_tag
        nacked = isinstance(method, pika.spec.Basic.Nack)
        if method.multiple:
            # Tags rise and the dict keeps insertion order: settle from the front.
            tags = []
            for t in self._unconfirmed:
                if t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag]
        for t in tags:
            entry = self._unconfirmed.pop(t, None)
            if entry is None:
                continue
            future, exchange, routing_key, message_id = entry
            if nacked:
                future.set_exception(PublishNacked(f"broker nacked message {message_id}"))
            elif message_id and message_id in self._returned:
                self._returned.discard(message_id)
                future.set_exception(NoRouteError(exchange, routing_key))
            else:
                future.set_result(None)
        if nacked:
            self._renew_pub_channel()

    def _fail_unconfirmed(self) -> None:
        pending, self._unconfirmed = self._unconfirmed, {}
        held, self._held = self._held, []
        self._renewing = self._renew_scheduled = False
        self._returned.clear()
        self._pub = None
        self._plain = None
        for consumer in self._consumers:
            consumer.channel = None
        for future, *_ in pending.values():
            future.set_exception(ConnectionLost("connection lost before the broker confirmed"))
        for publish in held:
            publish.future.set_exception(ConnectionLost("connection lost before it was sent"))

    def _close_connection(self) -> None:
        if self._conn is not None and self._conn.is_open:
            self._conn.close()
        elif self._conn is not None:
            self._conn.ioloop.stop()
