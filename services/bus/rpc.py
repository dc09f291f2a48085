"""The RPC client: one blocking AMQP connection per calling thread.

A call is one publish and a wait on the same connection, in the caller's own thread, the way a
hand-written pika client does it: no hand-off to the I/O thread and back, which would add two
thread wake-ups to every round trip. Requests are mandatory and unconfirmed (the reply is the
acknowledgement), replies come through direct reply-to. The connection has heartbeats off, so
an idle thread's connection is not closed under it.

A connection lost while a call waits is replaced and the request resent on the new one with
the same message id, until the call's timeout: safe, because a message id executes once (a
copy that arrives while the first still runs waits for its answer, see
services.bus.idempotency), and the caller gets the one answer instead of an error for a broker
blip. With several broker nodes (services.bus.nodes), the new connection goes to the first
node that answers, starting after the one lost. A broker none of whose nodes can be reached
fails the call at once (ConnectionLost).
"""

from __future__ import annotations

import threading
import time
from functools import partial

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import pika.spec

from services.bus.errors import ConnectionLost, NoRouteError, RpcTimeout
from services.bus.nodes import blocking_nodes

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Queues a reply may be sent to: direct reply-to (the broker names the caller's channel
# `amq.rabbitmq.reply-to.<token>`) and exclusive server-named queues (`amq.gen-…`), both private
# to the caller's connection.
_REPLY_PREFIXES = (DIRECT_REPLY_TO, "amq.gen-")


def is_reply_queue(name: str) -> bool:
    return name.startswith(_REPLY_PREFIXES)


_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


class _Channel:
    """One thread's connection, channel and reply bookkeeping."""

    def __init__(
        self, connection: pika.BlockingConnection, params: pika.URLParameters, *, confirm: bool
    ) -> None:
        self.connection = connection
        self.params = params  # the node it is connected to
        self.channel = self.connection.channel()
        if confirm:
            self.channel.confirm_delivery()
        self.replies: dict[str, tuple[pika.spec.BasicProperties, bytes]] = {}
        self.returned: set[str] = set()
        self.channel.add_on_return_callback(self._on_return)
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(
        self,
        _ch: pika.adapters.blocking_connection.BlockingChannel,
        _method: pika.spec.Basic.Deliver,
        props: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        if props.correlation_id:
            self.replies[props.correlation_id] = (props, body)

    def _on_return(
        self,
        _ch: pika.adapters.blocking_connection.BlockingChannel,
        _method: pika.spec.Basic.Return,
        props: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        if props.correlation_id:
            self.returned.add(props.correlation_id)

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        except Exception:  # already broken: nothing to release but the socket
            pass


class RpcClient:
    """Blocking request/reply over per-thread connections. Thread-safe."""

    def __init__(self, url: str, name: str) -> None:
        self._nodes = blocking_nodes(url, f"{name}-rpc")
        self._local = threading.local()
        self._all: list[_Channel] = []
        self._lock = threading.Lock()
        self._closed = False

    def _channel(self) -> _Channel:
        ch: _Channel | None = getattr(self._local, "channel", None)
        if ch is not None and ch.connection.is_open:
            return ch
        if self._closed:
            raise ConnectionLost("bus is closed")
        if ch is not None:
            self._forget(ch)
        try:
            # The first node that answers (services.bus.nodes): a dead node is skipped.
            connection, params = self._nodes.connect()
            # On a cluster, an unconfirmed publish to a quorum queue whose leader just died
            # can vanish without a trace (measured: the caller then waits its whole timeout);
            # a confirmed one is handed to the new leader. The confirm comes with the commit
            # that delivery to the consumer waits for anyway, so it costs little. A lone node
            # has no leader to change: a request reaches its queue or the connection dies.
            ch = _Channel(connection, params, confirm=len(self._nodes) > 1)
        except _LOST as exc:
            raise ConnectionLost(f"cannot reach the broker: {exc!r}") from None
        self._local.channel = ch
        with self._lock:
            self._all.append(ch)
        return ch

    def _forget(self, ch: _Channel) -> None:
        ch.close()
        self._local.channel = None
        with self._lock:
            if ch in self._all:
                self._all.remove(ch)

    def call(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.spec.BasicProperties,
        timeout: float,
    ) -> tuple[pika.spec.BasicProperties, bytes]:
        """Publish the request and wait for its reply, matched by the request's AMQP
        correlation_id (unique per call: Bus.call sets it to the message id)."""
        cid = properties.correlation_id
        assert cid, "an RPC request needs a correlation id"
        properties.reply_to = DIRECT_REPLY_TO
        deadline = time.monotonic() + timeout
        backoff = 0.1
        while True:
            ch = self._channel()  # ConnectionLost at once when the broker cannot be reached
            ch.replies.pop(cid, None)
            ch.returned.discard(cid)
            try:
                try:
                    ch.channel.basic_publish(
                        exchange, routing_key, body, properties, mandatory=True
                    )
                except pika.exceptions.UnroutableError:  # in confirm mode
                    raise NoRouteError(exchange, routing_key) from None
                except pika.exceptions.NackError:
                    # In confirm mode: the queue had no leader to take it. A channel opened
                    # while the leader was being elected keeps refusing (measured: for as
                    # long as it lives), so send again on a new channel, until the timeout.
                    self._forget(ch)
                    if deadline - time.monotonic() <= backoff:
                        raise ConnectionLost(
                            "the broker refused the request (nack): queue unavailable"
                        ) from None
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                # One timer for the whole wait: process_data_events with a time limit sets up
                # and tears down a timer on every turn, which costs more than the round trip's
                # own processing. The timer firing is an event, so the wait below returns.
                expired: list[bool] = []
                remaining = max(deadline - time.monotonic(), 0.0)
                timer = ch.connection.call_later(remaining, partial(expired.append, True))
                try:
                    while cid not in ch.replies:
                        if cid in ch.returned:
                            ch.returned.discard(cid)
                            raise NoRouteError(exchange, routing_key)
                        if expired:
                            raise RpcTimeout(f"no reply from {routing_key!r} within {timeout:g} s")
                        ch.connection.process_data_events(time_limit=None)
                finally:
                    ch.connection.remove_timeout(timer)
                return ch.replies.pop(cid)
            except _LOST as exc:
                self._forget(ch)
                self._nodes.failed(ch.params)
                # Resend with the same message id on a new connection (it executes once).
                if deadline - time.monotonic() <= backoff:
                    raise ConnectionLost(
                        f"broker connection lost while waiting for the reply: {exc!r}"
                    ) from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            channels, self._all = self._all, []
        # Connections of other threads are closed from here too: pika's BlockingConnection
        # close is only safe from its own thread, so just drop the sockets.
        for ch in channels:
            try:
                ch.connection._impl._transport._sock.close()
            except Exception:
                pass
