"""A compute node in a process of its own (so tests can kill -9 it) and an independent event
subscriber that records every domain event it sees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import Command, GetDomainInfo
from protos.events import DomainEvent
from protos.replies import DomainInfo
from services.bus import Bus, RemoteError


class ComputeProcess:
    """`flotilla-compute` for one host name and state dir, started and ended by its pid."""

    def __init__(
        self,
        amqp_url: str,
        state_dir: Path,
        host: str,
        env: dict[str, str] | None = None,
        module: str = "compute_node.main",
    ) -> None:
        self.amqp_url = amqp_url
        self.module = module
        self.env = env or {}
        self.state_dir = state_dir
        self.host = host
        self.queue = routing.compute_queue(host)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, bus: Bus, timeout: float = 30.0) -> ComputeProcess:
        log = (self.state_dir / "compute.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                "--host",
                self.host,
                "--state-dir",
                str(self.state_dir),
                "--amqp-url",
                self.amqp_url,
                "--log-level",
                "info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FLOTILLA_HEARTBEAT_INTERVAL_S": "1", **self.env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:  # serving once a harmless command gets an answer
            try:
                bus.call(self.queue, GetDomainInfo(domain_id=uuid.UUID(int=0)), timeout=2)
            except RemoteError:
                return self
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"compute node exited: {self.log()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"compute node not serving: {self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        path = self.state_dir / "compute.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: nothing gets to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class EventLog:
    """Every domain event from the events exchange, kept per domain in arrival order."""

    def __init__(self, bus: Bus) -> None:
        self._events: defaultdict[uuid.UUID, list[DomainEvent]] = defaultdict(list)
        self._ids: set[str] = set()
        self.duplicates: list[str] = []
        self.by_id: dict[str, DomainEvent] = {}  # every event seen, by message id
        self._cond = threading.Condition()
        self.subscription = bus.subscribe(["domain.#"], self._on_event)

    def _on_event(self, envelope: Envelope, event: Message) -> None:
        if not isinstance(event, DomainEvent):
            return
        with self._cond:
            if envelope.id in self._ids:
                self.duplicates.append(envelope.id)
                return
            self._ids.add(envelope.id)
            self.by_id[envelope.id] = event
            self._events[event.domain_id].append(event)
            self._cond.notify_all()

    def of(self, domain_id: uuid.UUID) -> list[DomainEvent]:
        with self._cond:
            return list(self._events[domain_id])

    def kinds(self, domain_id: uuid.UUID) -> list[tuple[str, str]]:
        return [(e.TYPE, str(getattr(e, "detail", ""))) for e in self.of(domain_id)]

    def wait(
        self,
        domain_id: uuid.UUID,
        predicate: Callable[[list[DomainEvent]], bool],
        timeout: float = 15.0,
    ) -> list[DomainEvent]:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self._events[domain_id]), timeout)
            events = list(self._events[domain_id])
        assert ok, f"timed out; events so far: {[(e.TYPE, e.seq) for e in events]}"
        return events

    def wait_type(self, domain_id: uuid.UUID, type_name: str, count: int = 1) -> DomainEvent:
        events = self.wait(domain_id, lambda evs: sum(type_name == e.TYPE for e in evs) >= count)
        return [e for e in events if type_name == e.TYPE][count - 1]


def call(bus: Bus, queue: str, command: Command, timeout: float = 20.0) -> DomainInfo:
    reply = bus.call(queue, command, timeout=timeout)
    assert isinstance(reply, DomainInfo), reply
    return reply
