"""Broker URL lists: one URL per node of a RabbitMQ cluster, tried in order with failover.

`amqp_url` settings (and FLOTILLA_AMQP_URL) take one URL or several separated by commas. A
process connects to the first node that answers; when that connection is lost, it tries the
next node in the list first (the one it lost has probably gone), wrapping around.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import pika
import pika.exceptions
from pydantic import AfterValidator

SCHEMES = ("amqp://", "amqps://")


def split_urls(value: str) -> list[str]:
    """The URLs in a comma-separated list; ValueError (saying which entry) when one is not an
    AMQP URL or the list is empty."""
    urls = [part.strip() for part in value.split(",")]
    if not any(urls):
        raise ValueError("no broker URL given")
    for i, url in enumerate(urls):
        if not url.startswith(SCHEMES):
            shown = url.split("@")[-1] if "@" in url else url  # never echo a password
            raise ValueError(f"broker URL #{i + 1} ({shown!r}) must start with amqp:// or amqps://")
    return urls


def check_urls(value: str) -> str:
    """A config validator: the list, checked, as one normalised comma-separated string."""
    return ",".join(split_urls(value))


# A settings field holding one broker URL or a comma-separated list of them.
BrokerUrls = Annotated[str, AfterValidator(check_urls)]


class NodeList:
    """Connection parameters for each node, and which node to try first.

    Thread-safe enough for its use: the index is a hint (a stale read only changes which node
    is tried first).
    """

    def __init__(self, url: str, configure: Callable[[pika.URLParameters], None]) -> None:
        self.urls = split_urls(url)
        self.params: list[pika.URLParameters] = []
        for one in self.urls:
            params = pika.URLParameters(one)
            configure(params)
            self.params.append(params)
        self.current = 0

    def __len__(self) -> int:
        return len(self.params)

    @property
    def first(self) -> pika.URLParameters:
        """The node to try now."""
        return self.params[self.current % len(self.params)]

    def in_order(self) -> list[pika.URLParameters]:
        """Every node, starting with the one to try now."""
        start = self.current % len(self.params)
        return self.params[start:] + self.params[:start]

    def failed(self, params: pika.URLParameters) -> None:
        """`params`' node failed: try the one after it next."""
        for i, known in enumerate(self.params):
            if known is params:
                self.current = (i + 1) % len(self.params)

    def connect(self) -> tuple[pika.BlockingConnection, pika.URLParameters]:
        """A blocking connection to the first node that answers, in `in_order()`; the last
        node's error is raised if none does."""
        error: pika.exceptions.AMQPError | None = None
        for params in self.in_order():
            try:
                connection = pika.BlockingConnection(params)
            except pika.exceptions.AMQPError as exc:
                error = exc
                self.failed(params)
                continue
            except (OSError, ValueError) as exc:
                # A connection reset right after the TCP accept (a node going down, a cut)
                # reaches pika's set-up as "Expected connected socket" (ValueError): a node
                # that did not answer, like any other.
                error = pika.exceptions.AMQPConnectionError(repr(exc))
                self.failed(params)
                continue
            self.current = next(i for i, known in enumerate(self.params) if known is params)
            return connection, params
        assert error is not None
        raise error


def blocking_configure(name: str) -> Callable[[pika.URLParameters], None]:
    """For a connection owned by one thread: no AMQP heartbeats (a thread busy in a long
    handler or idle between calls would miss them and lose its connection), one connection
    attempt per node (callers retry with their own backoff)."""

    def configure(params: pika.URLParameters) -> None:
        params.heartbeat = 0
        params.connection_attempts = 1
        params.tcp_options = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}
        params.client_properties = {"connection_name": name}

    return configure


def blocking_nodes(url: str, name: str) -> NodeList:
    return NodeList(url, blocking_configure(name))
