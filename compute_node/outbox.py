"""Publishes the store's outbox: every event, in order, confirmed by the broker before its row
is deleted. While the broker is unreachable rows wait; they go out when it returns."""

from __future__ import annotations

import threading
from collections import deque

import structlog

from compute_node.store import OutboxItem, Store
from protos import routing
from protos.codec import decode
from services.bus import Bus
from services.bus.bus import properties_for
from services.bus.confirm import Confirmation

log = structlog.get_logger("flotilla.compute.outbox")
CONFIRM_TIMEOUT_S = 30.0
# Both threads are woken by notifications (a commit, a confirm, stop()), checked under the
# condition's lock so none is missed; the timed wake is only a safety net. At one a second it
# was most of an idle host's CPU (bench/scale.py runs a thousand hosts on two cores).
IDLE_RECHECK_S = 15.0


class OutboxPublisher:
    """Two threads, and the committing threads: a row committed while the publisher is caught
    up (every row before it handed to the link, the link up) is published at once by the
    thread that committed it (the store's outbox hook, in row order under the store's lock);
    the sender waits for the confirms, in order, and publishes from the table whatever the
    hook did not (a backlog, rows committed while the broker was away, a resend after a
    failed confirm); the reaper makes confirmed rows durable (`Store.sync`, an fsync) and
    deletes them, so that fsync never delays the next event."""

    def __init__(self, store: Store, bus: Bus) -> None:
        self._store = store
        self._bus = bus
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="outbox-reaper", daemon=True)
        self._confirmed = 0  # the last row the broker confirmed, all before it too
        self._reaped = 0
        self._reap_cond = threading.Condition()
        # Under the store's lock: rows handed to the link and not yet confirmed, in order;
        # the last row handed; whether every committed row up to it was (the hook's licence).
        self._inflight: deque[tuple[OutboxItem, Confirmation]] = deque()
        self._handed = 0
        self._caught_up = False
        self.published = 0
        self.sent_directly = 0  # rows the committing thread published

    def start(self) -> OutboxPublisher:
        self._store.on_outbox(self._direct)
        self._thread.start()
        self._reaper.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._store.on_outbox(None)
        with self._store.changed:
            self._store.changed.notify_all()
        self._thread.join(timeout)
        with self._reap_cond:
            self._reap_cond.notify_all()
        self._reaper.join(timeout)

    def _publish(self, item: OutboxItem) -> Confirmation:
        envelope = item.envelope if item.envelope is not None else decode(item.body)
        return self._bus.link.publish(
            routing.EVENTS_EXCHANGE, item.routing_key, item.body, properties_for(envelope)
        )

    def _hand(self, items: list[OutboxItem]) -> None:
        for item in items:
            self._inflight.append((item, self._publish(item)))
        self._handed = items[-1].row

    def _direct(self, items: list[OutboxItem]) -> None:
        # The committing thread, under the store's lock, the rows just committed.
        if not self._caught_up or self._stopping.is_set() or items[0].row <= self._handed:
            return
        if not self._bus.link.connected:
            self._caught_up = False  # the sender takes them from the table when it is back
            return
        self._hand(items)
        self.sent_directly += len(items)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            with self._store.changed:
                if not self._inflight:
                    items = self._store.outbox(after=self._handed)
                    if not items:
                        self._caught_up = self._bus.link.connected
                        if not self._stopping.is_set():
                            self._store.changed.wait(IDLE_RECHECK_S if self._caught_up else 1.0)
                        continue
                    self._caught_up = False
                    if self._bus.link.connected:
                        self._hand(items)  # else wait for the link below, outside the lock
                head = self._inflight[0] if self._inflight else None
            if head is None:
                self._bus.link.wait_connected(1.0)
                continue
            item, future = head
            try:
                future.result(CONFIRM_TIMEOUT_S)
            except Exception as exc:
                log.warning("event not confirmed; will resend", error=str(exc))
                self._resend_from(self._confirmed)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            with self._store.changed:
                self._inflight.popleft()
            self.published += 1
            with self._reap_cond:
                self._confirmed = item.row
                self._reap_cond.notify_all()

    def _resend_from(self, row: int) -> None:
        """Forget what is in flight (cancelled: nothing not yet sent goes later) and send
        again from the table every row after `row`, the last one confirmed."""
        with self._store.changed:
            for _, future in self._inflight:
                future.cancel()
            self._inflight.clear()
            self._handed = row
            self._caught_up = False

    def _reap(self) -> None:
        while True:
            with self._reap_cond:
                while self._confirmed <= self._reaped and not self._stopping.is_set():
                    self._reap_cond.wait(IDLE_RECHECK_S)
                target = self._confirmed
            if target > self._reaped:
                self._store.outbox_done(target)  # syncs first
                self._reaped = target
            elif self._stopping.is_set():
                return
