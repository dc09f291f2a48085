"""The compute node's outbox publisher (compute_node.outbox) on a real broker: events committed
while it is caught up go out from the committing thread, in row order; rows committed while
the link is down, or whose confirm failed, go out from the table, none lost."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from compute_node.outbox import OutboxPublisher
from compute_node.store import EventDraft, Store
from protos import routing
from protos.codec import decode
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainResumed, DomainSuspended, ResumedDetail, SuspendedDetail
from tests.bootfiles import KERNEL
from tests.integration.conftest import MakeBus

PAUSE = [EventDraft(DomainSuspended, PowerState.PAUSED, SuspendedDetail.PAUSED)]
RESUME = [EventDraft(DomainResumed, PowerState.RUNNING, ResumedDetail.UNPAUSED)]


class Subscriber:
    """A plain pika consumer of one domain's events on its own connection: (seq, message id)
    in the order they arrive."""

    def __init__(self, amqp_url: str, domain_id: uuid.UUID) -> None:
        self.got: list[tuple[int, str]] = []
        self._conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = self._conn.channel()
        ch.exchange_declare(routing.EVENTS_EXCHANGE, "topic", durable=True, passive=True)
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(queue, routing.EVENTS_EXCHANGE, f"domain.*.{domain_id}")
        ch.basic_consume(queue, self._on, auto_ack=True)
        self._ch = ch
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _on(self, _ch: object, _m: object, props: pika.BasicProperties, body: bytes) -> None:
        self.got.append((int(decode(body).body["seq"]), str(props.message_id)))

    def _run(self) -> None:
        while not self._stop:
            self._conn.process_data_events(time_limit=0.05)

    def wait_seqs(self, last: int, timeout: float = 20.0) -> list[int]:
        """The seqs received once every seq up to `last` is in (duplicates by id dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seqs = self.unique()
            if set(range(1, last + 1)) <= set(seqs):
                return seqs
            time.sleep(0.01)
        raise AssertionError(f"not every seq up to {last} arrived: {self.unique()}")

    def unique(self) -> list[int]:
        seen: set[str] = set()
        out = []
        for seq, mid in list(self.got):
            if mid not in seen:
                seen.add(mid)
                out.append(seq)
        return out

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._conn.close()


@pytest.fixture
def parts(
    make_bus: MakeBus, amqp_url: str, tmp_path: Path
) -> Iterator[tuple[Store, OutboxPublisher, Subscriber, uuid.UUID]]:
    bus = make_bus("compute:outbox-test")
    store = Store(tmp_path / "compute.db", host="outbox-test", source="compute:outbox-test")
    spec = DomainSpec(name=f"o-{uuid.uuid4().hex[:8]}", boot=BootSpec(kernel=str(KERNEL)))
    sub = Subscriber(amqp_url, spec.uuid)
    store.define(spec, [])
    publisher = OutboxPublisher(store, bus).start()
    try:
        yield store, publisher, sub, spec.uuid
    finally:
        publisher.stop()
        sub.close()
        store.close()


def caught_up(publisher: OutboxPublisher, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not publisher._caught_up:
        assert time.monotonic() < deadline, "the publisher never caught up"
        time.sleep(0.01)


def test_events_committed_while_caught_up_go_out_from_the_committing_thread_in_order(
    parts: tuple[Store, OutboxPublisher, Subscriber, uuid.UUID],
) -> None:
    store, publisher, sub, domain = parts
    caught_up(publisher)
    for n in range(1, 61):
        store.transition(domain, PAUSE if n % 2 else RESUME, driver_n=n, journaled=f"{n}/1.{n}")
    assert sub.wait_seqs(60) == list(range(1, 61))
    assert publisher.sent_directly == 60
    deadline = time.monotonic() + 10
    while store.outbox_size() and time.monotonic() < deadline:  # confirmed, then reaped
        time.sleep(0.01)
    assert store.outbox_size() == 0


def test_rows_committed_across_a_cut_connection_all_go_out_in_order(
    parts: tuple[Store, OutboxPublisher, Subscriber, uuid.UUID],
) -> None:
    store, publisher, sub, domain = parts
    caught_up(publisher)
    link = publisher._bus.link
    made = link.connections_made
    n = 0
    for _ in range(3):  # events before, during and after each cut
        for _ in range(15):
            n += 1
            store.transition(domain, PAUSE if n % 2 else RESUME, driver_n=n, journaled=f"{n}/2.{n}")
        assert link.wait_connected(20)
        conn = link._conn
        assert conn is not None
        link._submit(conn.close)
        for _ in range(15):
            n += 1
            store.transition(domain, PAUSE if n % 2 else RESUME, driver_n=n, journaled=f"{n}/2.{n}")
        time.sleep(0.05)
    seqs = sub.wait_seqs(n, timeout=60)
    assert link.connections_made >= made + 1
    # Every event arrived; any copy past the first (a resend after a failed confirm) carries
    # the same message id and was dropped above, so the first copies are in seq order.
    assert seqs == list(range(1, n + 1))
    caught_up(publisher)
    assert publisher.sent_directly < n  # the rows of the cuts went out from the table
    before = publisher.sent_directly
    store.transition(domain, PAUSE if (n + 1) % 2 else RESUME, driver_n=n + 1, journaled="x/1")
    sub.wait_seqs(n + 1)
    assert publisher.sent_directly == before + 1  # and the direct path is back
