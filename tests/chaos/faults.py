"""Faults injected on a schedule, each by pid or on the socket: broker connections cut (every
client connection of a node reset), a broker node killed (-9) and restarted, the
compute worker killed (-9) and restarted, a VMM killed (-9), an API replica and a scheduler
replica killed (-9) and restarted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.rig import Rig

# (fraction of the run, fault) — one round; longer runs repeat it. The broker node goes first:
# its restart and rejoin (20-40 s on a loaded host) then overlap the rest of a short run
# instead of holding up its end.
ROUND = (
    (0.08, "kill_broker_node"),
    (0.14, "kill_vmm"),
    (0.20, "kill_compute_fake"),
    (0.27, "kill_api"),
    (0.33, "cut_connections"),
    (0.45, "kill_scheduler"),
    (0.52, "cut_connections"),
    (0.58, "kill_compute_kvm"),
    (0.64, "kill_vmm"),
    (0.70, "kill_api"),
    (0.76, "kill_scheduler"),
    (0.82, "cut_connections"),
)


@dataclass
class Injected:
    at: float  # seconds into the run
    fault: str
    detail: str


def vmm_pids(base: Path) -> dict[int, str]:
    """Every VMM process (`compute_node.vmm`) whose working dir (its domain dir) lies under
    `base`, by pid: what `ps` would show."""
    found: dict[int, str] = {}
    root = str(base.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = str((entry / "cwd").readlink())
        except OSError:
            continue
        if b"compute_node.vmm" in cmdline and cwd.startswith(root + "/"):
            found[int(entry.name)] = cwd
    return found


@dataclass
class FaultPlan:
    rig: Rig
    duration: float
    injected: list[Injected] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # a fault that could not be injected
    _turn: dict[str, int] = field(default_factory=dict)
    _background: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def schedule(self) -> list[tuple[float, str]]:
        """Rounds of ROUND, one per 90 s of run (at least one)."""
        rounds = max(1, round(self.duration / 90))
        span = self.duration / rounds
        return [(r * span + f * span, name) for r in range(rounds) for f, name in ROUND]

    def run(self) -> None:
        t0 = time.monotonic()
        for at, name in self.schedule():
            if self.stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            try:
                detail = self._faults()[name]()
            except Exception as exc:
                self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if detail:
                self.injected.append(Injected(round(time.monotonic() - t0, 1), name, detail))

    def finish(self, timeout: float = 360.0) -> None:
        """Wait for the restarts still under way (a broker node rejoining)."""
        deadline = time.monotonic() + timeout
        for t in self._background:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.failures.append(f"{t.name} still running after {timeout:.0f} s")

    def _next(self, kind: str, n: int) -> int:
        i = self._turn.get(kind, 0)
        self._turn[kind] = i + 1
        return i % n

    def _faults(self) -> dict[str, Callable[[], str]]:
        return {
            "cut_connections": self._cut,
            "kill_broker_node": self._kill_broker_node,
            "kill_compute_fake": lambda: self._kill_compute("fake"),
            "kill_compute_kvm": lambda: self._kill_compute("kvm"),
            "kill_vmm": self._kill_vmm,
            "kill_api": lambda: self._kill_replica("api"),
            "kill_scheduler": lambda: self._kill_replica("scheduler"),
        }

    def _cut(self) -> str:
        """Every TCP connection to one node's AMQP port reset at once, both ends (`ss -K`,
        like a proxy dropping them); `rabbitmqctl close_all_connections` where `ss` is
        missing (it takes tens of seconds to start on a loaded machine)."""
        nodes = self.rig.cluster.nodes
        i = self._next("cut", len(nodes))
        node = nodes[i]
        ss = shutil.which("ss")
        if ss is None:
            node.close_all_connections("chaos")
            return f"node{i} (rabbitmqctl)"
        argv = [ss, "-K", "-t", "-n", "dst", "127.0.0.1", "dport", "=", str(node.port)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        cut = max(0, len(out.stdout.splitlines()) - 1)
        return f"node{i}: {cut} connections reset"

    def _kill_broker_node(self) -> str:
        cluster = self.rig.cluster
        i = self._next("broker", len(cluster.nodes))
        if any(t.is_alive() for t in self._background):
            return ""  # one node down at a time: a quorum of 2 of 3 must stand
        cluster.kill(i)

        def restart() -> None:
            time.sleep(3)
            try:
                cluster.restart(i, timeout=300)  # Erlang boots slowly on a loaded host
            except Exception as exc:
                self.failures.append(f"broker node{i} restart: {exc}")

        t = threading.Thread(target=restart, name=f"restart-broker-node{i}")
        t.start()
        self._background.append(t)
        return f"node{i}"

    def _kill_compute(self, driver: str) -> str:
        hosts = [c for c in self.rig.computes if c.driver == driver]
        if not hosts:
            hosts = [c for c in self.rig.computes if c.driver == "fake"]
        compute = hosts[self._next(f"compute-{driver}", len(hosts))]
        pid = compute.replica.pid
        compute.replica.kill()
        time.sleep(1)
        compute.replica.start()
        return f"{compute.host} pid {pid}"

    def _kill_vmm(self) -> str:
        pids = sorted(vmm_pids(self.rig.base))
        if not pids:
            return ""
        first = self._next("vmm", len(pids))
        # The workload stops guests all the time: one listed a moment ago may be gone.
        for pid in pids[first:] + pids[:first]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            return f"vmm pid {pid}"
        return ""

    def _kill_replica(self, kind: str) -> str:
        replicas = self.rig.apis if kind == "api" else self.rig.schedulers
        replica = replicas[self._next(kind, len(replicas))]
        pid = replica.pid
        replica.kill()
        time.sleep(1)
        replica.start()
        return f"{replica.name} pid {pid}"
