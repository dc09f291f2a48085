"""Removing a consumer while the link has no connection settles at once: `ServiceRunner.stop`
waits on it, and a service stopping after its broker went away used to wait out the whole
30 s timeout for a channel that was already gone."""

from __future__ import annotations

import time

from services.bus.link import Consumer, Link


def test_removing_a_consumer_with_no_connection_open_settles_at_once() -> None:
    # Never started: no connection is open, as while the broker is down.
    link = Link("amqp://u:p@127.0.0.1:9/%2F", name="test-removal", declarations=list)
    consumer = Consumer("q", lambda _delivery: None)
    link.add_consumer(consumer)
    started = time.monotonic()
    link.remove_consumer(consumer).result(timeout=5)
    assert time.monotonic() - started < 1.0
    link.close()
