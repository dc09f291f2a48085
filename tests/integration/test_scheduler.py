"""The scheduler on a real broker with in-process compute nodes on FakeDriver."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from compute_node.config import ComputeConfig
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos import routing
from protos.base import Message
from protos.bindings import DiskBinding
from protos.codec import Envelope
from protos.commands import GetDomainInfo
from protos.domain import BootSpec, DiskSpec, DomainSpec, PlacementHints, PowerState
from protos.replies import DomainInfo
from protos.scheduler import Placement, ScheduleDomain
from protos.storage import CreateVolume, VolumeInfo
from services.bus import Bus, RemoteError
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL

pytestmark = pytest.mark.integration

StartNodes = Callable[..., dict[str, ComputeNode]]
StartScheduler = Callable[..., Scheduler]


def spec(vcpus: int = 1, memory_mib: int = 256, **placement: object) -> DomainSpec:
    return DomainSpec(
        name=f"d-{uuid.uuid4().hex[:8]}",
        vcpus=vcpus,
        memory_mib=memory_mib,
        boot=BootSpec(kernel=KERNEL),
        placement=PlacementHints(**placement),  # type: ignore[arg-type]
    )


@pytest.fixture
def start_nodes(amqp_url: str, tmp_path: Path) -> Iterator[StartNodes]:
    """`start_nodes(n, vcpus=, memory_mib=)`: n compute nodes with distinct host names."""
    nodes: list[ComputeNode] = []
    tag = uuid.uuid4().hex[:6]

    def start(n: int, *, vcpus: int = 2, memory_mib: int = 1024) -> dict[str, ComputeNode]:
        made = {}
        for i in range(len(nodes), len(nodes) + n):
            host = f"sched-{tag}-{i}"
            config = ComputeConfig(
                host=host,
                state_dir=tmp_path / host,
                amqp_url=amqp_url,
                driver="fake",
                allowed_boot_dirs=[BOOT_DIR],
                cpu_allocation_ratio=1.0,
                reserved_host_memory_mib=0,
                heartbeat_interval_s=0.3,
            )
            node = ComputeNode(config, FakeDriver(vcpus, memory_mib)).start()
            nodes.append(node)
            made[host] = node
        return made

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def start_scheduler(amqp_url: str) -> Iterator[StartScheduler]:
    """`start_scheduler(hosts, **config)`: a replica that has heard from `hosts`."""
    made: list[Scheduler] = []

    def start(hosts: int, **config: object) -> Scheduler:
        config.setdefault("replica", f"sched-{uuid.uuid4().hex[:6]}")
        scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, **config))  # type: ignore[arg-type]
        made.append(scheduler.start())
        scheduler.wait_for_hosts(hosts)
        return scheduler

    yield start
    for scheduler in made:
        scheduler.stop()


def place(bus: Bus, domain: DomainSpec, max_attempts: int = 3) -> Placement:
    command = ScheduleDomain(spec=domain, project="p", max_attempts=max_attempts)
    reply = bus.call(routing.SCHEDULER_QUEUE, command, timeout=60)
    assert isinstance(reply, Placement)
    return reply


def state_on(bus: Bus, host: str, domain_id: uuid.UUID) -> PowerState:
    reply = bus.call(routing.compute_queue(host), GetDomainInfo(domain_id=domain_id), timeout=10)
    assert isinstance(reply, DomainInfo)
    return reply.state


def test_placement_defines_and_starts_the_domain_on_a_host(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    nodes = start_nodes(2)
    start_scheduler(2)
    bus = make_bus()
    domain = spec()
    placement = place(bus, domain)
    assert placement.host in nodes
    assert placement.info.state is PowerState.RUNNING
    assert state_on(bus, placement.host, domain.uuid) is PowerState.RUNNING
    assert nodes[placement.host].claims.holds(domain.uuid)


def test_anti_affinity_and_affinity_groups(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    start_nodes(3, vcpus=4, memory_mib=2048)
    start_scheduler(3)
    bus = make_bus()
    apart = [place(bus, spec(group="web", policy="anti-affinity")).host for _ in range(2)]
    assert apart[0] != apart[1]
    together = [place(bus, spec(group="db", policy="affinity")).host for _ in range(3)]
    assert len(set(together)) == 1


def test_a_spec_no_host_fits_is_no_valid_host_with_reasons(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    nodes = start_nodes(2, vcpus=2, memory_mib=1024)
    start_scheduler(2)
    bus = make_bus()
    with pytest.raises(RemoteError) as raised:
        place(bus, spec(vcpus=1, memory_mib=4096))
    err = raised.value
    assert err.code == "no_valid_host"
    assert err.details["attempts"] == []
    assert sorted(err.details["filtered"]["memory"]) == sorted(nodes)
    assert "memory removed 2" in err.message


def test_a_replica_that_stops_taking_events_for_a_while_still_places(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    """A replica's event thread held for 2 s (a busy process, a broker that stalled): by its
    own clock both hosts are 6 intervals silent, but it heard no host at all, so it is its own
    deafness, not two hosts dead at once. Once it takes events again, a host that really
    stopped is down while the other beats on."""
    nodes = start_nodes(2)  # beating every 0.3 s: down after 0.9 s of silence
    scheduler = start_scheduler(2)
    assert scheduler.subscription is not None
    handler = scheduler.subscription._handler
    release, held = threading.Event(), threading.Event()

    def hold(envelope: Envelope, event: Message) -> None:
        if not release.is_set():
            held.set()
            release.wait(30)
        handler(envelope, event)

    scheduler.subscription._handler = hold
    bus = make_bus()
    try:
        assert held.wait(5)
        time.sleep(2.0)
        placement = place(bus, spec())
        assert placement.info.state is PowerState.RUNNING
        assert placement.attempts == []
    finally:
        release.set()
    # Stop the host not running it (nodes can stop twice: the fixture's stop is a no-op then).
    (gone,) = set(nodes) - {placement.host}
    nodes[gone].stop()
    stopped = time.monotonic()
    state = scheduler.state
    while state.is_alive(state.hosts[gone], time.monotonic()):
        assert time.monotonic() - stopped < 5, "a stopped host was never down"
        time.sleep(0.05)
    assert state.is_alive(state.hosts[placement.host], time.monotonic())
    assert place(bus, spec()).host == placement.host


def test_a_refusing_compute_node_is_retried_on_another_host(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    ((big_host, big),) = start_nodes(1, memory_mib=4096).items()  # spread picks it first
    ((small_host, small),) = start_nodes(1, memory_mib=2048).items()
    start_scheduler(2, top_n=1)
    bus = make_bus()
    assert isinstance(big.driver, FakeDriver)
    assert isinstance(small.driver, FakeDriver)
    big.driver.fail_next_spawn = "boom"
    domain = spec()
    placement = place(bus, domain)
    assert placement.host == small_host
    assert [(a.host, a.code) for a in placement.attempts] == [(big_host, "spawn_failed")]
    assert "boom" in placement.attempts[0].message
    assert state_on(bus, small_host, domain.uuid) is PowerState.RUNNING
    assert big.store.get(domain.uuid) is None  # the refusing host was left with nothing

    big.driver.fail_next_spawn = small.driver.fail_next_spawn = "boom"
    with pytest.raises(RemoteError) as raised:
        place(bus, spec(), max_attempts=2)
    assert raised.value.code == "no_valid_host"
    attempts = raised.value.details["attempts"]
    assert [(a["host"], a["code"]) for a in attempts] == [
        (big_host, "spawn_failed"),
        (small_host, "spawn_failed"),
    ]


def test_two_replicas_and_many_concurrent_requests_never_over_commit(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    nodes = start_nodes(3, vcpus=4, memory_mib=1024)  # room for 3 x 4 of (1 vCPU, 256 MiB)
    start_scheduler(3, top_n=3, workers=4)
    start_scheduler(3, top_n=3, workers=4)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    buses = [make_bus() for _ in range(4)]

    def one(i: int) -> None:
        try:
            place(buses[i % len(buses)], spec(), max_attempts=3)
            result = "placed"
        except RemoteError as exc:
            result = exc.code
        with lock:
            outcomes[result] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(16)))
    assert set(outcomes) <= {"placed", "no_valid_host"}
    # Room for 12: replicas that collide are refused by the compute node and go elsewhere, so
    # nearly all of it is used; a request refused by all three hosts in a race is the rare loss.
    assert 10 <= outcomes["placed"] <= 12
    used = 0
    for node in nodes.values():
        usage, limits = node.claims.usage(), node.claims.limits()
        assert usage.vcpus <= limits.vcpus
        assert usage.memory_mib <= limits.memory_mib
        used += usage.vcpus
    assert used == outcomes["placed"]


def test_a_domain_with_a_volume_on_one_host_lands_there(
    make_bus: Callable[..., Bus], start_nodes: StartNodes, start_scheduler: StartScheduler
) -> None:
    nodes = start_nodes(2)
    start_scheduler(2)
    bus = make_bus()
    for host in nodes:
        # A volume in the host's own `default` pool, made by its storage agent.
        volume_id = uuid.uuid4()
        made = bus.call(
            routing.storage_queue(host),
            CreateVolume(pool="default", volume_id=volume_id, size=1 << 20),
            timeout=20,
        )
        assert isinstance(made, VolumeInfo)
        binding = DiskBinding(target="vda", volume_id=volume_id, pool="default", host=host)
        domain = spec().model_copy(update={"disks": [DiskSpec(target="vda", volume_id=volume_id)]})
        command = ScheduleDomain(spec=domain, project="p", disks=[binding])
        placement = bus.call(routing.SCHEDULER_QUEUE, command, timeout=60)
        assert isinstance(placement, Placement)
        assert placement.host == host
        assert placement.info.state is PowerState.RUNNING
        record = nodes[host].store.get(domain.uuid)
        assert record is not None
        assert record.bindings.disks == (binding,)
    # Volumes on both hosts: no host can take it, and the answer names the filter.
    a, b = sorted(nodes)
    disks = [
        DiskBinding(target="vda", volume_id=uuid.uuid4(), pool="default", host=a),
        DiskBinding(target="vdb", volume_id=uuid.uuid4(), pool="default", host=b),
    ]
    with pytest.raises(RemoteError) as raised:
        bus.call(
            routing.SCHEDULER_QUEUE,
            ScheduleDomain(spec=spec(), project="p", disks=disks),
            timeout=60,
        )
    assert raised.value.code == "no_valid_host"
    assert sorted(raised.value.details["filtered"]["volume_locality"]) == [a, b]
