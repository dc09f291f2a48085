"""Randomized fault injection into live migrations between two KVM compute node processes on a
real broker (docs/migration.md, "Tests"; docs/testing.md says how to run the long one).

One guest (`memtest=16 counter=20`: it reads its memtest region back every 20 lines) migrates
back and forth in verify mode. Each run picks, from a seeded random generator, a fault and a
moment: none, kill -9 of the target's VMM, kill -9 of the target compute node (restarted
after), the stream dropped (both ends' TCP sockets destroyed with `ss -K`), a cancel
(AbortMigration), or a timeout (a tiny `timeout_s` under a bandwidth cap, either action).
After each run: exactly one running copy (one node lists the domain, running; one live VMM
process of it on the machine, found by its command line, and it is that node's), its memory
intact (a MEMCHECK after the run with the MEMTEST checksum), its counter going on with no
reboot, and the domain's events forming one unbroken seq 1..N across both nodes.

FLOTILLA_MIGRATION_FAULT_RUNS sets the number of runs (default: 100 when pytest runs with
`-m slow` alone, else one run of each fault); FLOTILLA_MIGRATION_FAULT_SEED replays a run
(the seed is printed, and every failure names it with the run's fault and moment).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    ListDomains,
    ResumeDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainEvent, DomainMigrationProgress
from protos.migration import (
    FINAL_PHASES,
    AbortMigration,
    GetMigrationJob,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    StartMigration,
    TimeoutAction,
)
from protos.replies import ConsoleOutput, DomainInfo, DomainList
from services.bus import Bus, RemoteError
from services.bus.errors import BusError
from tests.guest_console import MEMTEST, counters, since
from tests.integration.compute_harness import ComputeProcess, EventLog

pytestmark = [pytest.mark.integration, pytest.mark.kvm, pytest.mark.slow]

FAULTS = ("none", "kill_vmm", "kill_node", "drop", "cancel", "timeout")
SETTLE_S = 60.0


def fault_runs(config: pytest.Config) -> int:
    if os.environ.get("FLOTILLA_MIGRATION_FAULT_RUNS"):
        return int(os.environ["FLOTILLA_MIGRATION_FAULT_RUNS"])
    return 100 if str(config.getoption("markexpr")).strip() == "slow" else len(FAULTS)


@dataclass
class Run:
    """What one run does: `fault` after `delay_s` of the migration, with these params."""

    n: int
    fault: str
    delay_s: float
    params: MigrationParams
    down_s: float = 0.0  # kill_node: how long the target node stays down

    def __str__(self) -> str:
        p = self.params
        timeout = "none" if p.timeout_s is None else f"{p.timeout_s:.3f} s {p.timeout_action.value}"
        return (
            f"run {self.n}: {self.fault} at +{self.delay_s:.3f} s (bandwidth "
            f"{p.bandwidth_mibps} MiB/s, timeout {timeout})"
        )


def plan(rng: random.Random, n: int, fault: str) -> Run:
    if fault == "timeout":
        params = MigrationParams(
            bandwidth_mibps=rng.choice((4, 8)),
            timeout_s=rng.uniform(0.05, 0.6),
            timeout_action=rng.choice(list(TimeoutAction)),
            verify=True,
        )
        return Run(n, fault, 0.0, params)
    # A cap stretches the pre-copy (16 MiB of memtest and the image) so a moment drawn in
    # its span can fall in any phase; without one the whole stream takes well under 1 s.
    bandwidth = rng.choice((0, 16, 32, 64))
    span = 0.6 if bandwidth == 0 else 20.0 / bandwidth
    # Verify mode: every page checksummed on arrival, all of RAM compared before the commit.
    params = MigrationParams(bandwidth_mibps=bandwidth, verify=True)
    return Run(n, fault, rng.uniform(0.0, span), params, rng.uniform(0.0, 3.0))


class Cloud:
    """The two nodes, the client bus, the event log and the guest."""

    def __init__(self, nodes: list[ComputeProcess], bus: Bus, events: EventLog) -> None:
        self.nodes = nodes
        self.bus = bus
        self.events = events
        self.domain_id = uuid.UUID(int=0)
        self.checksum = ""

    def listed(self, node: ComputeProcess) -> list[DomainInfo]:
        reply = self.bus.call(node.queue, ListDomains(), timeout=10)
        assert isinstance(reply, DomainList)
        return [d for d in reply.domains if d.domain_id == self.domain_id]

    def owner(self) -> ComputeProcess:
        owners = [n for n in self.nodes if self.listed(n)]
        assert len(owners) == 1, [n.host for n in owners]
        return owners[0]

    def console(self, node: ComputeProcess) -> str:
        reply = self.bus.call(node.queue, GetConsole(domain_id=self.domain_id), timeout=10)
        assert isinstance(reply, ConsoleOutput)
        return reply.data

    def vmm_pid(self, node: ComputeProcess) -> int | None:
        path = node.state_dir / "domains" / str(self.domain_id) / "vmm.pid"
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None


def vmm_processes(domain_id: uuid.UUID) -> list[tuple[int, str]]:
    """Every live VMM process of the domain on this machine, recorded or not: (pid, domain
    dir) of each `python -m compute_node.vmm` (begun cold or as a warm spare) whose working
    dir, its domain dir, names the domain."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = str((proc / "cwd").readlink())
        except OSError:
            continue
        vmm = b"compute_node.vmm" in args
        if vmm and Path(cwd).name == str(domain_id) and alive(int(proc.name)):
            found.append((int(proc.name), cwd))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def drop_stream(vmm_pid: int) -> bool:
    """Destroy both ends of the target VMM's TCP connections (the migration stream: its
    control socket is a Unix one) with sock_destroy (`ss -K`), each by its exact addresses."""
    listing = subprocess.run(
        ["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True
    )
    pairs = [line.split()[2:4] for line in listing.stdout.splitlines() if f"pid={vmm_pid}," in line]
    for local, peer in pairs:
        for src, dst in ((local, peer), (peer, local)):
            subprocess.run(
                ["ss", "-K", "-t", "src", src, "dst", dst], capture_output=True, check=True
            )
    return bool(pairs)


@pytest.fixture(scope="module")
def cloud(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    import native
    import native.testguest

    reason = native.kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"KVM unavailable: {reason}")
    guest = native.testguest.build()
    tag = uuid.uuid4().hex[:6]
    env = {"FLOTILLA_ALLOWED_BOOT_DIRS": str(guest.parent)}
    buses: list[Bus] = []

    def make_bus(source: str) -> Bus:
        bus = Bus(amqp_url, source=source)
        buses.append(bus)
        return bus.start(timeout=30)

    bus = make_bus("test-client")
    events = EventLog(make_bus("test-watcher"))
    base = tmp_path_factory.mktemp("mig-faults")
    nodes = []
    for name in ("a", "b"):
        (base / name).mkdir()
        nodes.append(ComputeProcess(amqp_url, base / name, f"kfault-{name}-{tag}", env))
    try:
        for node in nodes:
            node.start(bus)
        cloud = Cloud(nodes, bus, events)
        spec = DomainSpec(
            name=f"kfault-{tag}",
            boot=BootSpec(kernel=str(guest), cmdline="ready memtest=16 counter=20"),
            memory_mib=64,
        )
        cloud.domain_id = spec.uuid
        bus.call(nodes[0].queue, DefineDomain(spec=spec), timeout=20)
        bus.call(nodes[0].queue, StartDomain(domain_id=spec.uuid), timeout=20)
        deadline = time.monotonic() + 20
        while not (m := MEMTEST.search(cloud.console(nodes[0]))):
            assert time.monotonic() < deadline, cloud.console(nodes[0])[-400:]
            time.sleep(0.1)
        cloud.checksum = m[1]
        yield cloud
        owner = cloud.owner()
        if cloud.listed(owner)[0].state is not PowerState.SHUTOFF:
            bus.call(owner.queue, DestroyDomain(domain_id=spec.uuid), timeout=20)
        bus.call(owner.queue, UndefineDomain(domain_id=spec.uuid), timeout=20)
    finally:
        for node in nodes:
            node.stop()
        events.subscription.close()
        for b in buses:
            b.close()
        for node in nodes:  # guests a failed run left behind, by the pids their VMMs recorded
            for pid_file in (node.state_dir / "domains").glob("*/vmm.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass


def inject(cloud: Cloud, run: Run, source: ComputeProcess, target: ComputeProcess) -> str:
    """The run's fault at its moment; what actually happened (for the failure message)."""
    time.sleep(run.delay_s)
    if run.fault == "kill_vmm":
        if job_phase(cloud, source) in FINAL_PHASES:
            return "none: the job had ended"  # the guest's own VMM by now, no fault of ours
        pid = cloud.vmm_pid(target)
        if pid is None:
            return "no target VMM to kill"
        os.kill(pid, signal.SIGKILL)
        return f"killed target VMM {pid}"
    if run.fault == "kill_node":
        target.kill()
        time.sleep(run.down_s)
        target.start(cloud.bus)
        return f"killed the target node, restarted it {run.down_s:.1f} s later"
    if run.fault == "drop":
        pid = cloud.vmm_pid(target)
        return "dropped the stream" if pid and drop_stream(pid) else "no stream to drop"
    if run.fault == "cancel":
        try:
            job = cloud.bus.call(
                source.queue, AbortMigration(domain_id=cloud.domain_id), timeout=10
            )
        except RemoteError as exc:
            return f"abort refused: {exc.code} {exc.message}"
        assert isinstance(job, MigrationJob)
        return f"aborted: {job.phase.value}"
    return "no fault"


def job_phase(cloud: Cloud, source: ComputeProcess) -> MigrationPhase:
    job = cloud.bus.call(source.queue, GetMigrationJob(domain_id=cloud.domain_id), timeout=10)
    assert isinstance(job, MigrationJob)
    return job.phase


def wait_job(cloud: Cloud, source: ComputeProcess) -> MigrationJob:
    deadline = time.monotonic() + SETTLE_S
    while True:
        job = cloud.bus.call(source.queue, GetMigrationJob(domain_id=cloud.domain_id), timeout=10)
        assert isinstance(job, MigrationJob)
        if job.phase in FINAL_PHASES:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def settle(cloud: Cloud) -> tuple[ComputeProcess, DomainInfo]:
    """Wait until one node lists the domain and one VMM runs it (none if it is shut off
    there); its node and info."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        listed = {n.host: cloud.listed(n) for n in cloud.nodes}
        pids = vmm_processes(cloud.domain_id)
        owners = [n for n in cloud.nodes if listed[n.host]]
        running = [n.host for n in cloud.nodes for _, d in pids if d.startswith(str(n.state_dir))]
        if len(owners) == 1:
            info = listed[owners[0].host][0]
            if running == ([] if info.state is PowerState.SHUTOFF else [owners[0].host]):
                return owners[0], info
        assert time.monotonic() < deadline, f"listed {listed}, VMMs {pids}"
        time.sleep(0.2)


def restart_killed(cloud: Cloud, owner: ComputeProcess) -> int:
    """The target's VMM was killed just after the commit: the guest died on its new host
    (shut off there, as any guest whose VMM is killed). Boot it again; its last counter."""
    cloud.bus.call(owner.queue, StartDomain(domain_id=cloud.domain_id), timeout=20)
    deadline = time.monotonic() + 20
    while True:
        text = cloud.console(owner)
        after = text[text.rfind("READY") :]
        memtest = MEMTEST.search(after)
        if memtest and counters(after):
            assert memtest[1] == cloud.checksum, memtest[0]
            return counters(after)[-1]
        assert time.monotonic() < deadline, text[-600:]
        time.sleep(0.1)


def check_events(cloud: Cloud, seq: int) -> list[DomainEvent]:
    """Every lifecycle event of the domain so far: seq 1..`seq`, each once."""
    events = cloud.events.wait(
        cloud.domain_id,
        lambda evs: max((e.seq for e in evs), default=0) >= seq,
    )
    lifecycle = sorted(
        (e for e in events if not isinstance(e, DomainMigrationProgress)), key=lambda e: e.seq
    )
    seqs = [e.seq for e in lifecycle]
    assert seqs == list(range(1, seq + 1)), [(e.TYPE, e.host, e.seq) for e in lifecycle]
    return lifecycle


def check_guest(cloud: Cloud, owner: ComputeProcess, last: int) -> None:
    """The guest counts on past `last` with no reboot and reads its memtest region back
    intact after it."""
    deadline = time.monotonic() + 20
    while True:
        text = cloud.console(owner)
        after = since(text, last)
        if after.checks:
            break
        assert time.monotonic() < deadline, f"no memory check after COUNTER {last}: {text[-600:]}"
        time.sleep(0.1)
    assert all(c == f"ok checksum=0x{cloud.checksum}" for c in after.checks), after.checks
    assert after.consecutive(), after.counters[:30]
    assert after.boots == 0, after


def test_randomized_faults_leave_one_intact_copy_with_seq_unbroken(
    cloud: Cloud, request: pytest.FixtureRequest
) -> None:
    runs = fault_runs(request.config)
    seed = int(os.environ.get("FLOTILLA_MIGRATION_FAULT_SEED") or random.randrange(1 << 32))
    print(f"\nmigration fault runs: {runs}, seed {seed} (FLOTILLA_MIGRATION_FAULT_SEED)")
    rng = random.Random(seed)
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    outcomes: dict[str, dict[str, int]] = {}
    started = time.monotonic()
    seq = check_events(cloud, 2)[-1].seq
    for n in range(runs):
        # One of each fault first, then at random.
        run = plan(rng, n, kinds[n] if n < len(kinds) else rng.choice(FAULTS))
        source = cloud.owner()
        target = next(node for node in cloud.nodes if node is not source)
        last = counters(cloud.console(source))[-1]
        what = "?"
        try:
            cloud.bus.call(
                source.queue,
                StartMigration(domain_id=cloud.domain_id, target=target.host, params=run.params),
                timeout=30,
            )
            what = inject(cloud, run, source, target)
            job = wait_job(cloud, source)
            owner, info = settle(cloud)
            if info.state is PowerState.SHUTOFF:
                assert run.fault == "kill_vmm", info
                assert job.phase is MigrationPhase.DONE, job
                assert owner is target, owner.host
                what += ", after the commit: the guest died at the target"
                last = restart_killed(cloud, owner)
                info = settle(cloud)[1]
            if info.state is PowerState.PAUSED:  # a timeout with the `pause` action
                assert run.fault == "timeout"
                assert run.params.timeout_action is TimeoutAction.PAUSE
                cloud.bus.call(owner.queue, ResumeDomain(domain_id=cloud.domain_id), timeout=20)
                info = settle(cloud)[1]
            assert info.state is PowerState.RUNNING, info
            assert (owner is target) == (job.phase is MigrationPhase.DONE), (owner.host, job)
            check_guest(cloud, owner, last)
            check_events(cloud, info.seq)
            seq = info.seq
        except (AssertionError, BusError, RuntimeError) as exc:
            raise AssertionError(f"seed {seed}, {run} ({what}): {exc}") from exc
        print(f"{run} ({what}): {job.phase.value} on {owner.host}, seq {seq}")
        tally = outcomes.setdefault(run.fault, {})
        tally[job.phase.value] = tally.get(job.phase.value, 0) + 1
    elapsed = time.monotonic() - started
    print(f"{runs} runs in {elapsed:.1f} s, seq {seq}; outcomes by fault: {outcomes}")
