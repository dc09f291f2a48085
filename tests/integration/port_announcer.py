"""The network service's side towards compute nodes, played by a test or a bench that makes
its ports by hand: `port.bound` / `port.deleted` published as the service publishes them
(with their network's routing key), and `ListBoundPorts` answered from what was announced,
on the real `network` queue of a real broker."""

from __future__ import annotations

import threading
import uuid
from ipaddress import IPv4Address

from protos import routing
from protos.bindings import PortBinding
from protos.network import BoundPorts, ListBoundPorts, PortBound, PortDeleted
from services.bus import Bus, Context, Service, ServiceRunner, handles


class PortAnnouncer(Service):
    name = "network"

    def __init__(self, bus: Bus, project: str = "test") -> None:
        self.bus = bus
        self.project = project
        self._lock = threading.Lock()
        self._seq: dict[uuid.UUID, int] = {}
        self._bound: dict[uuid.UUID, PortBound] = {}
        self._runner: ServiceRunner | None = None
        self.asked: list[ListBoundPorts] = []

    def start(self) -> PortAnnouncer:
        self._runner = ServiceRunner(self.bus, self, queue=routing.NETWORK_QUEUE)
        self._runner.start()
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()

    def _next(self, port_id: uuid.UUID) -> int:
        self._seq[port_id] = self._seq.get(port_id, 0) + 1
        return self._seq[port_id]

    def bound(self, port: PortBinding, host: str, vtep: str) -> None:
        with self._lock:
            event = PortBound(
                port_id=port.port_id,
                network_id=port.network.network_id,
                project=self.project,
                mac=port.mac,
                ipv4=port.ipv4,
                vni=port.network.vni,
                seq=self._next(port.port_id),
                host=host,
                vtep=IPv4Address(vtep),
            )
            self._bound[port.port_id] = event
        self.bus.publish_event(event, timeout=10)

    def deleted(self, port: PortBinding) -> None:
        with self._lock:
            self._bound.pop(port.port_id, None)
            event = PortDeleted(
                port_id=port.port_id,
                network_id=port.network.network_id,
                project=self.project,
                mac=port.mac,
                ipv4=port.ipv4,
                vni=port.network.vni,
                seq=self._next(port.port_id),
            )
        self.bus.publish_event(event, timeout=10)

    @handles(ListBoundPorts)
    def bound_ports(self, cmd: ListBoundPorts, _ctx: Context | None) -> BoundPorts:
        wanted = set(cmd.network_ids)
        with self._lock:
            self.asked.append(cmd)
            return BoundPorts(ports=[p for p in self._bound.values() if p.network_id in wanted])
