"""The broker a benchmark uses: FLOTILLA_AMQP_URL's, else a private RabbitMQ node it starts
and stops (services.broker)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from services.broker import PrivateBroker
from services.broker import available as broker_available


def have_broker() -> bool:
    """Whether a broker can be had: FLOTILLA_AMQP_URL is set or rabbitmq-server is installed."""
    return bool(os.environ.get("FLOTILLA_AMQP_URL")) or broker_available()


@contextlib.contextmanager
def broker_url(
    tmp: Path, name: str = "flotilla-bench", *, start_timeout: float = 60.0
) -> Iterator[str]:
    """FLOTILLA_AMQP_URL, or the URL of a private node under `tmp` for the `with` block (a
    loaded host boots RabbitMQ slowly: `start_timeout`)."""
    url = os.environ.get("FLOTILLA_AMQP_URL")
    if url:
        yield url
        return
    node = PrivateBroker(tmp / "rabbitmq", name=name)
    node.start(timeout=start_timeout)
    try:
        yield node.url
    finally:
        node.stop()
