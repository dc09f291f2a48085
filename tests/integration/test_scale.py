"""Scale simulation: 200 FakeDriver compute nodes on the real broker, 2,000 domains.

The compute nodes run 50 to a process (`python -m tests.integration.test_scale --first N
--count 50 ...`, the `__main__` below), each with its own connection, `compute.<host>` queue
and heartbeat every second, so the broker carries 200 host queues and ~200 heartbeats a second
to each scheduler replica. Two scheduler replicas run in the test process; eight client threads
send the 2,000 `ScheduleDomain` requests at once. At the end every host is asked (ListDomains)
what it runs: all 2,000 are running, each exactly once, and no host holds more than its limits.
State dirs live on /dev/shm when there is one (the compute store fsyncs every transition).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import pytest

from protos import routing
from protos.commands import ListDomains
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.replies import DomainList
from protos.scheduler import Placement, ScheduleDomain
from services.bus import Bus, RemoteError
from services.bus.topology import delete_queue
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL

HOSTS = 200
PER_PROCESS = 50
DOMAINS = 2000
CLIENTS = 8
HEARTBEAT_S = 1.0


def host_vcpus(i: int) -> int:
    return 10 + i % 5  # 10..14 vCPUs: 2,400 in all for 2,000 one-vCPU domains


def host_memory_mib(i: int) -> int:
    return 2048 + 512 * (i % 3)


def host_name(tag: str, i: int) -> str:
    return f"scale-{tag}-{i:03d}"


# ---- the node process -------------------------------------------------------------------------


def serve_nodes(argv: list[str]) -> int:
    from compute_node.config import ComputeConfig  # child process only
    from compute_node.fake import FakeDriver
    from compute_node.node import ComputeNode
    from services import log

    parser = argparse.ArgumentParser()
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    log.configure("warning")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    nodes = []
    try:
        for i in range(args.first, args.first + args.count):
            host = host_name(args.tag, i)
            config = ComputeConfig(
                host=host,
                state_dir=args.state_dir / host,
                amqp_url=args.amqp_url,
                driver="fake",
                allowed_boot_dirs=[BOOT_DIR],
                cpu_allocation_ratio=1.0,
                reserved_host_memory_mib=0,
                heartbeat_interval_s=HEARTBEAT_S,
            )
            driver = FakeDriver(host_vcpus(i), host_memory_mib(i))
            nodes.append(ComputeNode(config, driver).start())
        print("ready", flush=True)
        stop.wait()
    finally:
        for node in nodes:
            node.stop()
    return 0


# ---- the test ---------------------------------------------------------------------------------


@pytest.fixture
def node_processes(amqp_url: str) -> Iterator[str]:
    tag = uuid.uuid4().hex[:6]
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="flotilla-scale-", dir=shm if shm.is_dir() else None))
    procs: list[subprocess.Popen[str]] = []
    try:
        for first in range(0, HOSTS, PER_PROCESS):
            argv = ["--amqp-url", amqp_url, "--state-dir", str(root), "--tag", tag]
            argv += ["--first", str(first), "--count", str(PER_PROCESS)]
            module = [sys.executable, "-m", "tests.integration.test_scale"]
            proc = subprocess.Popen([*module, *argv], stdout=subprocess.PIPE, text=True)
            procs.append(proc)  # one by one: the finally below ends those already started
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", f"node process exited ({proc.poll()})"
        yield tag
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
        params = pika.URLParameters(amqp_url)
        for i in range(HOSTS):  # durable queues would outlive the test on a shared broker
            try:
                delete_queue(params, routing.compute_queue(host_name(tag, i)))
            except Exception:
                pass


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_200_hosts_2000_domains_all_running_none_over_committed(
    amqp_url: str, node_processes: str
) -> None:
    tag = node_processes
    schedulers = [
        Scheduler(SchedulerConfig(amqp_url=amqp_url, replica=f"scale-{r}", workers=8)).start()
        for r in range(2)
    ]
    buses = [Bus(amqp_url, source=f"scale-client-{i}").start() for i in range(CLIENTS)]
    try:
        for scheduler in schedulers:
            scheduler.wait_for_hosts(HOSTS, timeout=60)
        placements: dict[uuid.UUID, str] = {}
        failures: Counter[str] = Counter()
        reasons: list[str] = []
        attempts = Counter[int]()
        lock = threading.Lock()

        def place(i: int) -> None:
            spec = DomainSpec(
                name=f"vm-{i:04d}",
                vcpus=1,
                memory_mib=128 if i % 2 else 192,
                boot=BootSpec(kernel=KERNEL),
            )
            command = ScheduleDomain(spec=spec, project="scale", max_attempts=5)
            try:
                reply = buses[i % CLIENTS].call(routing.SCHEDULER_QUEUE, command, timeout=120)
            except RemoteError as exc:
                with lock:
                    failures[exc.code] += 1
                    reasons.append(f"{spec.name}: {exc}")
                return
            assert isinstance(reply, Placement)
            assert reply.info.state is PowerState.RUNNING
            with lock:
                placements[spec.uuid] = reply.host
                attempts[len(reply.attempts)] += 1

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS * 4) as pool:
            list(pool.map(place, range(DOMAINS)))
        elapsed = time.monotonic() - started
        print(f"{DOMAINS} placements in {elapsed:.1f} s; hosts refused first: {dict(attempts)}")
        assert not failures, (failures, reasons[:5])
        assert len(placements) == DOMAINS

        # Ask every host what it runs: the compute nodes' own view, not the scheduler's.
        running: dict[uuid.UUID, str] = {}
        for i in range(HOSTS):
            host = host_name(tag, i)
            reply = buses[0].call(routing.compute_queue(host), ListDomains(), timeout=30)
            assert isinstance(reply, DomainList)
            domains = reply.domains
            assert all(d.state is PowerState.RUNNING for d in domains), host
            assert sum(d.vcpus for d in domains) <= host_vcpus(i), host
            assert sum(d.memory_mib for d in domains) <= host_memory_mib(i), host
            for d in domains:
                assert d.domain_id not in running, f"{d.domain_id} on two hosts"
                running[d.domain_id] = host
        assert running == placements
    finally:
        for bus in buses:
            bus.close()
        for scheduler in schedulers:
            scheduler.stop()


if __name__ == "__main__":
    sys.exit(serve_nodes(sys.argv[1:]))
