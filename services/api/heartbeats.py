"""Heartbeats into the registry, coalesced newest per host.

Every host beats every few seconds and every API replica records every beat (a private
subscription each). One transaction per beat is what a replica did before: at hundreds of
hosts (100 beats a second at 500 hosts beating every 5 s) the subscription fell behind the
writes under load, beats were recorded late and live hosts showed `down`. Here the
subscription only hands a beat over (newest per host wins, as in the table), and a thread of
the writer's own records what it holds in one transaction, at most once per `interval_s`:
a beat is recorded within about that long, whatever the rate, in one write per host per
flush. A beat held when the process dies is lost; the host's next one replaces it.
"""

from __future__ import annotations

import threading
import time

import structlog

from protos.host import HostHeartbeat
from services.api.registry import Registry
from services.db import DatabaseUnavailable

log = structlog.get_logger("flotilla.api.heartbeats")

FLUSH_INTERVAL_S = 0.2


class HeartbeatWriter:
    """`offer()` a beat from any thread; `start()` the writer, `stop()` records what is held."""

    def __init__(self, registry: Registry, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.transactions = 0  # writes made, for tests and metrics
        self._held: dict[str, tuple[HostHeartbeat, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-heartbeats", daemon=True)

    def start(self) -> HeartbeatWriter:
        self._thread.start()
        return self

    def offer(self, beat: HostHeartbeat, seen_at: float | None = None) -> None:
        """Hold `beat` for the next write unless a newer one of its host is held."""
        seen = time.time() if seen_at is None else seen_at
        with self._lock:
            held = self._held.get(beat.host)
            if held is None or held[1] <= seen:
                self._held[beat.host] = (beat, seen)
        self._wake.set()

    def flush(self) -> int:
        """Record every beat held, in one transaction; how many. A database that is away
        loses them: the hosts' next beats will do."""
        with self._lock:
            batch, self._held = self._held, {}
        if not batch:
            return 0
        try:
            self.registry.hosts.record_many(list(batch.values()))
            self.transactions += 1
        except DatabaseUnavailable as exc:
            log.warning("heartbeats not recorded", hosts=len(batch), error=str(exc))
        return len(batch)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("heartbeat write failed")
            self._stopping.wait(self.interval_s)  # what arrives meanwhile goes in one write
        self.flush()
