"""The compute node through AMQP on real KVM with the test guest.

    python bench/compute.py        # private rabbitmq-server node, or FLOTILLA_AMQP_URL

The compute node runs as `flotilla-compute` in a process of its own (as in a deployment) with a
temp state dir; the bench process is the client and, on a separate connection, an independent
event subscriber.

- start → STARTED: the client's clock just before it publishes `StartDomain` to the arrival of
  the `domain.started` event at the subscriber (so it includes the command's trip through the
  broker, the worker, the VMM's start, the journal, the outbox and the event's trip back);
- start → READY: the same start to the moment the `READY` line appears in the domain's
  `console.log` under the state dir (polled every 0.5 ms by the bench);
  both over GUESTS guests, one at a time (each destroyed after it was measured);
- cycles/s: define + start + destroy + undefine, each an AMQP RPC waited for, sequentially and
  from PARALLEL client threads at once; the better of the two is the figure;
- VMM RSS: VmRSS of each measured guest's VMM process once it printed READY (median); also
  the idle warm spare's (docs/compute.md "Warm VMMs"; FLOTILLA_WARM_VMMS=0 runs every VMM
  cold) and how many measured starts ran on it.

Anchors:
- cycles/s: Firecracker's published creation rate, 5 microVMs per host core per second, i.e.
  10/s on this 2-core host — a constant from Firecracker's specification, not measured here;
- start → STARTED: the VMM alone, measured in this run: `vmm_client.spawn()` of the same guest
  (no AMQP, no worker) until its control socket answers, by then `started` is journaled; the
  ratio is what the control plane adds;
- start → READY: Firecracker's specified bound, <= 125 ms from its InstanceStart API call to
  the guest's /sbin/init (a constant; a Linux guest there, the test guest here);
- VMM RSS: QEMU microvm's peak RSS from FACTS.md / bench/boot.py, 39 MiB (a constant).
Ends with one JSON line per figure; p99s and the rest go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import emit, figure, say
from compute_node.vmm import client as vmm_client
from native import kvm_unavailable_reason, testguest
from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetDomainInfo,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec
from protos.events import DomainEvent
from protos.replies import DomainInfo
from services.broker import PrivateBroker
from services.bus import Bus, RemoteError

GUESTS = 50
CYCLES = 60
PARALLEL = 4
ROUNDS = 3
MEMORY_MIB = 32
CMDLINE = "ready"
READY = b"READY vcpus=1"
FIRECRACKER_PER_CORE_PER_S = 5.0
HOST_CORES = os.cpu_count() or 1
ANCHOR_CYCLES = FIRECRACKER_PER_CORE_PER_S * HOST_CORES
FIRECRACKER_START_TO_INIT_MS = 125.0
QEMU_MICROVM_RSS_MIB = 39.0
DIRECT_SPAWNS = 15


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Arrivals:
    """Arrival time (monotonic) of each domain event, per (domain, event type)."""

    def __init__(self, bus: Bus) -> None:
        self._seen: dict[tuple[uuid.UUID, str], float] = {}
        self._cond = threading.Condition()
        self.subscription = bus.subscribe(["domain.#"], self._on_event)

    def _on_event(self, _envelope: Envelope, event: Message) -> None:
        now = time.monotonic()
        if isinstance(event, DomainEvent):
            with self._cond:
                self._seen.setdefault((event.domain_id, event.TYPE), now)
                self._cond.notify_all()

    def wait(self, domain_id: uuid.UUID, type_name: str, timeout: float = 20.0) -> float:
        key = (domain_id, type_name)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._seen, timeout):
                raise SystemExit(f"bench/compute: no {type_name} for {domain_id}")
            return self._seen[key]


class Node:
    """`flotilla-compute` as a subprocess, ended by its pid."""

    def __init__(self, url: str, state_dir: Path) -> None:
        self.host = f"bench-{uuid.uuid4().hex[:6]}"
        self.queue = routing.compute_queue(self.host)
        self.state_dir = state_dir
        log = (state_dir / "compute.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "compute_node.main",
                "--host",
                self.host,
                "--state-dir",
                str(state_dir),
                "--amqp-url",
                url,
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()

    def wait_serving(self, bus: Bus, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                bus.call(self.queue, GetDomainInfo(domain_id=uuid.UUID(int=0)), timeout=2)
            except RemoteError:
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.state_dir / "compute.log").read_text(errors="replace")[-2000:]
                    raise SystemExit(f"bench/compute: compute node not serving:\n{tail}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Guests left by a failed run: end them by the pids their VMMs recorded.
        for pid_file in (self.state_dir / "domains").glob("*/vmm.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ValueError, OSError):
                pass


def make_spec(guest: Path) -> DomainSpec:
    return DomainSpec.model_validate(
        {
            "name": f"b-{uuid.uuid4().hex[:10]}",
            "boot": BootSpec(kernel=str(guest), cmdline=CMDLINE),
            "memory_mib": MEMORY_MIB,
        }
    )


def call(bus: Bus, queue: str, command: DefineDomain | StartDomain | DestroyDomain) -> DomainInfo:
    reply = bus.call(queue, command, timeout=30)
    assert isinstance(reply, DomainInfo), reply
    return reply


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"bench/compute: no VmRSS for pid {pid}")


def wait_ready(console_log: Path, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if READY in console_log.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise SystemExit(f"bench/compute: no READY in {console_log}")


def began_warm(pid: int) -> bool:
    """Whether VMM `pid` started as the node's warm spare (its command line says so)."""
    return b"--spare" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def spare_rss_mib(state_dir: Path, timeout: float = 20.0) -> float | None:
    """The idle warm spare's VmRSS once it settled (imports done: asleep, the same twice
    0.3 s apart); None when the node keeps none."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for pid_file in (state_dir / "vmm-spares").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError, SystemExit):
                pid = int(pid_file.read_text().split()[0])
                stat = Path(f"/proc/{pid}/stat").read_text()
                now = (pid, rss_mib(pid))
                if now == last and stat.rsplit(")", 1)[1].split()[0] == "S":
                    return now[1]
                last = now
        time.sleep(0.3)
    return None


def latencies(
    bus: Bus, node: Node, arrivals: Arrivals, guest: Path
) -> tuple[list[float], list[float], list[float]]:
    """start → STARTED and start → READY (ms), and VMM RSS (MiB), one guest at a time."""
    started, ready, rss, replied = [], [], [], []
    warm = 0
    for _ in range(GUESTS):
        spec = make_spec(guest)
        call(bus, node.queue, DefineDomain(spec=spec))
        console_log = node.state_dir / "domains" / str(spec.uuid) / "console.log"
        sent = time.monotonic()
        info = call(bus, node.queue, StartDomain(domain_id=spec.uuid))
        replied.append((time.monotonic() - sent) * 1e3)
        ready_at = wait_ready(console_log)
        started.append((arrivals.wait(spec.uuid, "domain.started") - sent) * 1e3)
        ready.append((ready_at - sent) * 1e3)
        assert info.pid is not None
        rss.append(rss_mib(info.pid))
        warm += began_warm(info.pid)
        call(bus, node.queue, DestroyDomain(domain_id=spec.uuid))
        bus.call(node.queue, UndefineDomain(domain_id=spec.uuid), timeout=30)
    say(
        f"  start RPC reply: p50 {percentile(replied, 0.5):.1f} ms, "
        f"p99 {percentile(replied, 0.99):.1f} ms; {warm}/{GUESTS} started on the warm spare"
    )
    return started, ready, rss


def direct_spawn_ms(guest: Path, tmp: Path) -> list[float]:
    """The VMM alone: spawn() until its socket answers (started journaled), then destroy."""
    samples = []
    for i in range(DIRECT_SPAWNS + 1):
        directory = tmp / f"direct-{i}"
        directory.mkdir()
        config = {
            "domain_id": str(uuid.uuid4()),
            "name": f"direct-{i}",
            "kernel": str(guest),
            "cmdline": CMDLINE,
            "memory_mib": MEMORY_MIB,
        }
        (directory / "vmm.json").write_text(json.dumps(config))
        begin = time.monotonic()
        pid = vmm_client.spawn(directory)
        if i:  # the first one warms the page cache
            samples.append((time.monotonic() - begin) * 1e3)
        vmm_client.VmmClient(directory).destroy()
        vmm_client.wait_exit(pid, 5.0)
    return samples


def cycle(bus: Bus, queue: str, guest: Path) -> None:
    spec = make_spec(guest)
    call(bus, queue, DefineDomain(spec=spec))
    call(bus, queue, StartDomain(domain_id=spec.uuid))
    call(bus, queue, DestroyDomain(domain_id=spec.uuid))
    bus.call(queue, UndefineDomain(domain_id=spec.uuid), timeout=30)


def cycles_per_s(bus: Bus, queue: str, guest: Path, threads: int) -> float:
    per_thread = CYCLES // threads
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(per_thread):
                cycle(bus, queue, guest)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    begin = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - begin
    if errors:
        raise SystemExit(f"bench/compute: a cycle failed: {errors[0]!r}")
    return per_thread * threads / elapsed


@contextmanager
def broker() -> Iterator[str]:
    url = os.environ.get("FLOTILLA_AMQP_URL")
    if url:
        yield url
        return
    base = Path(tempfile.mkdtemp(prefix="flotilla-bench-"))
    node = PrivateBroker(base, name="bench")
    node.start()
    try:
        yield node.url
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/compute: no usable /dev/kvm: {reason}")
        return 2
    guest = testguest.build()
    with broker() as url, tempfile.TemporaryDirectory(prefix="bench-compute-") as tmp:
        state_dir = Path(tmp) / "state"
        state_dir.mkdir()
        bus = Bus(url, source="bench-client").start()
        watcher = Bus(url, source="bench-watcher").start()
        node = Node(url, state_dir)
        arrivals: Arrivals | None = None
        try:
            node.wait_serving(bus)
            arrivals = Arrivals(watcher)
            cycle(bus, node.queue, guest)  # warm-up: page cache, first imports
            spare_rss = spare_rss_mib(state_dir)
            started, ready, rss = latencies(bus, node, arrivals, guest)
            direct = direct_spawn_ms(guest, Path(tmp))
            sequential, parallel = [], []
            for round_no in range(ROUNDS):
                sequential.append(cycles_per_s(bus, node.queue, guest, 1))
                parallel.append(cycles_per_s(bus, node.queue, guest, PARALLEL))
                say(
                    f"round {round_no + 1}: cycles/s sequential {sequential[-1]:.1f}, "
                    f"{PARALLEL} in parallel {parallel[-1]:.1f}"
                )
        finally:
            node.stop()
            if arrivals is not None:
                arrivals.subscription.close()
            watcher.close()
            bus.close()

    seq_med, par_med = statistics.median(sequential), statistics.median(parallel)
    best, how = (seq_med, "sequential") if seq_med >= par_med else (par_med, f"{PARALLEL} parallel")
    say(f"compute: {GUESTS} guests ('{CMDLINE}', {MEMORY_MIB} MiB, 1 vCPU), one at a time")
    say(
        f"  start -> STARTED event at an independent subscriber: p50 "
        f"{percentile(started, 0.5):.1f} ms, p99 {percentile(started, 0.99):.1f} ms"
    )
    say(
        f"  start -> READY in console.log: p50 {percentile(ready, 0.5):.1f} ms, "
        f"p99 {percentile(ready, 0.99):.1f} ms"
    )
    say(
        f"  VMM alone (spawn until its socket answers, {DIRECT_SPAWNS} runs): median "
        f"{statistics.median(direct):.1f} ms"
    )
    say(f"  VMM RSS after READY: median {statistics.median(rss):.1f} MiB")
    if spare_rss is not None:
        say(f"  the idle warm spare VMM's RSS: {spare_rss:.1f} MiB")
    say(
        f"  define+start+destroy+undefine cycles/s (median of {ROUNDS} rounds of {CYCLES}): "
        f"sequential {seq_med:.1f}, {PARALLEL} in parallel {par_med:.1f}; reported: {how}"
    )
    say(
        f"  anchor: Firecracker's published 5 microVMs/core/s x {HOST_CORES} cores = "
        f"{ANCHOR_CYCLES:g}/s (a constant, not measured here)"
    )
    figures = [
        figure(
            "compute.start_to_started_p50",
            percentile(started, 0.5),
            "ms",
            anchor="vmm-spawn-alone (this run)",
            anchor_value=statistics.median(direct),
            target="none (reported)",
        ),
        figure(
            "compute.start_to_ready_p50",
            percentile(ready, 0.5),
            "ms",
            anchor="firecracker-instancestart-to-init <= 125 ms (constant)",
            anchor_value=FIRECRACKER_START_TO_INIT_MS,
            target="none (reported)",
        ),
        figure(
            "compute.cycles_per_s",
            best,
            f"cycles/s ({how})",
            anchor="firecracker-5-per-core-per-s (constant)",
            anchor_value=ANCHOR_CYCLES,
            target=">= 20 cycles/s",
        ),
        figure(
            "compute.vmm_rss_mib",
            statistics.median(rss),
            "MiB",
            anchor="qemu-microvm-peak-rss (FACTS.md, constant)",
            anchor_value=QEMU_MICROVM_RSS_MIB,
            target="none (reported)",
            spare_rss_mib=spare_rss,
        ),
    ]
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
