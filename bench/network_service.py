"""Network service benchmark: the control-plane share of bringing a port up.

    python bench/network_service.py     (a private RabbitMQ node unless FLOTILLA_AMQP_URL)

net.port_allocate_p50: what the scheduler waits for per domain with one NIC -- AllocatePorts
(a port, a MAC, an address from IPAM, its event, its reply, one transaction) then BindPorts
(its `port.bound` event) -- as RPCs through the broker to `flotilla-network`'s handlers on
a SQLite catalog, against the anchor of the same two RPCs to a handler that does nothing
(the same runner on a queue of its own: the bus's share), interleaved; a catalog read
(GetNetwork) is printed beside them. `net.port_ready_p50` (from the create request to a
guest reachable from another host's guest) needs NICs plugged on compute nodes and is not
measured here.

Human-readable results go to stderr; stdout ends with one JSON object per figure.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.figures import emit, figure, say  # noqa: E402
from protos import routing  # noqa: E402
from protos.domain import NicSpec  # noqa: E402
from protos.network import (  # noqa: E402
    AllocatePorts,
    BindPorts,
    CreateNetwork,
    GetNetwork,
    PortBindings,
    ReleasePorts,
)
from protos.replies import Done  # noqa: E402
from services.broker import PrivateBroker  # noqa: E402
from services.bus import Bus, Context, Service, ServiceRunner, handles  # noqa: E402
from services.network.config import NetworkConfig, NetworkQuota  # noqa: E402
from services.network.service import NetworkServer  # noqa: E402

ROUNDS = 200
WARMUP = 20


NOOP_QUEUE = "bench.noop"


class Noop(Service):
    """The anchor: the scheduler's two commands answered without touching anything."""

    name = "bench-noop"

    @handles(AllocatePorts)
    def allocate(self, _cmd: AllocatePorts, _ctx: Context) -> PortBindings:
        return PortBindings(ports=[])

    @handles(BindPorts)
    def bind(self, _cmd: BindPorts, _ctx: Context) -> Done:
        return Done()


def main() -> int:
    url = os.environ.get("FLOTILLA_AMQP_URL")
    node = None
    tmp = Path(tempfile.mkdtemp(prefix="flotilla-bench-netsvc-"))
    if not url:
        node = PrivateBroker(tmp / "rabbitmq", name="bench-net")
        node.start()
        url = node.url
    server = NetworkServer(
        NetworkConfig(
            amqp_url=url,
            database_url=f"sqlite:///{tmp / 'catalog.db'}",
            replica="bench",
            quarantine_s=0,
            quotas={"bench": NetworkQuota(networks=10, ports=10_000)},
        )
    )
    bus = Bus(url, source="bench")
    noop: ServiceRunner | None = None
    try:
        server.start()
        bus.start()
        noop = ServiceRunner(bus, Noop(), queue=NOOP_QUEUE, concurrency=4).start()
        return measure(bus)
    finally:
        if noop is not None:
            noop.stop()
        bus.close()
        server.stop()
        if node is not None:
            node.stop()


def measure(bus: Bus) -> int:
    network_id = uuid.uuid4()
    bus.call(
        routing.NETWORK_QUEUE,
        CreateNetwork(
            network_id=network_id,
            project="bench",
            name="bench",
            subnet=IPv4Network("10.98.0.0/16"),
        ),
        timeout=30,
    )
    allocate: list[float] = []
    noop: list[float] = []
    read: list[float] = []

    def two_rpcs(queue: str, domain: uuid.UUID) -> float:
        start = time.perf_counter()
        bus.call(
            queue,
            AllocatePorts(domain_id=domain, project="bench", nics=[NicSpec(network="bench")]),
            timeout=30,
        )
        bus.call(
            queue,
            BindPorts(domain_id=domain, host="bench-host", vtep=IPv4Address("192.0.2.1")),
            timeout=30,
        )
        return time.perf_counter() - start

    for i in range(WARMUP + ROUNDS):
        domain = uuid.uuid4()
        ours = two_rpcs(routing.NETWORK_QUEUE, domain)
        anchor = two_rpcs(NOOP_QUEUE, domain)
        start = time.perf_counter()
        bus.call(routing.NETWORK_QUEUE, GetNetwork(network_id=network_id, project="bench"))
        catalog_read = time.perf_counter() - start
        bus.call(routing.NETWORK_QUEUE, ReleasePorts(domain_id=domain), timeout=30)
        if i >= WARMUP:
            allocate.append(ours)
            noop.append(anchor)
            read.append(catalog_read)
    ours_ms = statistics.median(allocate) * 1e3
    anchor_ms = statistics.median(noop) * 1e3
    read_ms = statistics.median(read) * 1e3
    say(f"net.port_allocate ({ROUNDS} interleaved rounds, medians)")
    say(f"  AllocatePorts + BindPorts, network service   {ours_ms:7.3f} ms")
    say(f"  the same two RPCs to a handler doing nothing {anchor_ms:7.3f} ms")
    say(f"  GetNetwork (one RPC, a catalog read)         {read_ms:7.3f} ms")
    emit(
        [
            figure(
                "net.port_allocate_p50",
                ours_ms,
                "ms",
                anchor="the same 2 RPCs to a no-op handler",
                anchor_value=anchor_ms,
                target="<= 10 ms (port_ready's budget is 50 ms)",
            )
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
