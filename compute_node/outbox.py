"""Publishes the store's outbox: every event, in order, confirmed by the broker before its row
is deleted. While the broker is unreachable rows wait; they go out when it returns."""

from __future__ import annotations

import threading

import structlog

from compute_node.store import Store
from protos import routing
from protos.codec import decode
from services.bus import Bus
from services.bus.bus import properties_for

log = structlog.get_logger("flotilla.compute.outbox")
CONFIRM_TIMEOUT_S = 30.0
# Both threads are woken by notifications (a commit, a confirm, stop()), checked under the
# condition's lock so none is missed; the timed wake is only a safety net. At one a second it
# was most of an idle host's CPU (bench/scale.py runs a thousand hosts on two cores).
IDLE_RECHECK_S = 15.0


class OutboxPublisher:
    """Two threads: the sender publishes rows as soon as they are committed (woken by the
    store's condition) and waits for their confirms; the reaper makes confirmed rows durable
    (`Store.sync`, an fsync) and deletes them, so that fsync never delays the next event."""

    def __init__(self, store: Store, bus: Bus) -> None:
        self._store = store
        self._bus = bus
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="outbox-reaper", daemon=True)
        self._confirmed = 0  # the last row the broker confirmed, all before it too
        self._reaped = 0
        self._reap_cond = threading.Condition()
        self.published = 0

    def start(self) -> OutboxPublisher:
        self._thread.start()
        self._reaper.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._store.changed:
            self._store.changed.notify_all()
        self._thread.join(timeout)
        with self._reap_cond:
            self._reap_cond.notify_all()
        self._reaper.join(timeout)

    def _run(self) -> None:
        backoff = 0.1
        sent = 0  # rows up to here are confirmed: never sent again by this publisher
        while not self._stopping.is_set():
            items = self._store.outbox(after=sent)
            if not items:
                with self._store.changed:
                    if not self._store.outbox_size(after=sent) and not self._stopping.is_set():
                        self._store.changed.wait(IDLE_RECHECK_S)
                continue
            if not self._bus.link.wait_connected(1.0):
                continue
            futures = []
            for item in items:
                props = properties_for(decode(item.body))
                futures.append(
                    self._bus.link.publish(
                        routing.EVENTS_EXCHANGE, item.routing_key, item.body, props
                    )
                )
            done_row = None
            for item, future in zip(items, futures, strict=True):
                try:
                    future.result(CONFIRM_TIMEOUT_S)
                except Exception as exc:
                    log.warning("event not confirmed; will resend", error=str(exc))
                    break
                done_row = item.row
                self.published += 1
            if done_row is not None:
                sent = done_row
                with self._reap_cond:
                    self._confirmed = done_row
                    self._reap_cond.notify_all()
            if done_row != items[-1].row:
                for future in futures:
                    future.cancel()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

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
