"""A storage service replica in a process of its own (so tests can kill -9 it), beside a
compute node whose storage agent serves a real pool directory, and a watcher of volume
events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import Command
from protos.storage import VolumeEvent
from protos.volumes import CreateVolume, ListPools, Pools
from services.bus import Bus


class StorageProcess:
    """`flotilla-storage` with its catalog at `database_url`, started and ended by its pid."""

    def __init__(
        self,
        amqp_url: str,
        database_url: str,
        log_path: Path,
        *,
        replica: str,
        agent_hosts: list[str],
        default_pool: str,
        shared_pools: str = "",
        lease_s: float = 2.0,
    ) -> None:
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.log_path = log_path
        self.replica = replica
        self.agent_hosts = agent_hosts
        self.default_pool = default_pool
        self.shared_pools = shared_pools
        self.lease_s = lease_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, bus: Bus, timeout: float = 60.0) -> StorageProcess:
        log = self.log_path.open("ab")
        offset = log.tell()  # this start's lines follow any earlier run's
        argv = [
            sys.executable,
            "-m",
            "services.storage.main",
            "--amqp-url",
            self.amqp_url,
            "--database-url",
            self.database_url,
            "--replica",
            self.replica,
            "--default-pool",
            self.default_pool,
            "--log-level",
            "info",
        ]
        if self.agent_hosts:
            argv += ["--agent-hosts", ",".join(self.agent_hosts)]
        if self.shared_pools:
            argv += ["--shared-pools", self.shared_pools]
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "FLOTILLA_STORAGE_LEASE_S": str(self.lease_s),
                "FLOTILLA_STORAGE_RECONCILE_INTERVAL_S": "1",
            },
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:  # serving once it says so (its own log) and the catalog knows pools
            if self.proc.poll() is not None:
                raise RuntimeError(f"storage service exited: {self.log()}")
            if b"storage service serving" in self.log_path.read_bytes()[offset:]:
                pools = bus.call(routing.STORAGE_QUEUE, ListPools(), timeout=10)
                assert isinstance(pools, Pools)
                if pools.pools:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"storage service not serving: {self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class VolumeWatcher:
    """Every volume event a subscriber of the events exchange sees, in arrival order."""

    def __init__(self, bus: Bus) -> None:
        self.events: list[tuple[Envelope, VolumeEvent]] = []
        self._cond = threading.Condition()
        self.subscription = bus.subscribe(["volume.#"], self._on_event)

    def _on_event(self, envelope: Envelope, event: Message) -> None:
        assert isinstance(event, VolumeEvent)
        with self._cond:
            self.events.append((envelope, event))
            self._cond.notify_all()

    def of(self, volume_id: uuid.UUID, count: int, timeout: float = 20.0) -> list[VolumeEvent]:
        def mine() -> list[VolumeEvent]:
            return [e for _, e in self.events if e.volume_id == volume_id]

        with self._cond:
            self._cond.wait_for(lambda: len(mine()) >= count, timeout)
            found = mine()
        assert len(found) >= count, [(e.TYPE, e.seq) for e in found]
        return found

    def all_of(self, bus: Bus, volume_id: uuid.UUID) -> list[tuple[Envelope, VolumeEvent]]:
        """Every event of the volume published so far: a marker volume is created, and once
        its event arrived so did every one before it (one storage replica's outbox publishes
        in order)."""
        marker = uuid.uuid4()
        call(bus, CreateVolume(volume_id=marker, project="marker", name=marker.hex, size=1 << 20))
        self.of(marker, 1)
        with self._cond:
            return [(env, e) for env, e in self.events if e.volume_id == volume_id]


def call(bus: Bus, command: Command, timeout: float = 60.0) -> Message:
    return bus.call(routing.STORAGE_QUEUE, command, timeout=timeout)
