"""Ports in the catalog: allocated per domain (one per NIC, idempotent by domain), bound to
the host that runs the domain, released (addresses quarantined) when it goes.

A member sees only its own project's ports, also on a shared network.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from protos.bindings import PortBinding
from protos.network import (
    AllocatePorts,
    BindPorts,
    DhcpLease,
    PortBound,
    PortCreated,
    PortDeleted,
    PortEvent,
    PortInfo,
)
from services.bus import ServiceError
from services.db import advisory_xact_lock
from services.network import ipam
from services.network import networks as nets
from services.network.config import NetworkQuota
from services.network.tables import networks, ports

_MAC_PREFIX = "52:54:00"  # the locally administered range libvirt and QEMU use


def random_mac() -> str:
    tail = secrets.token_bytes(3)
    return _MAC_PREFIX + "".join(f":{b:02x}" for b in tail)


@dataclass(frozen=True, slots=True)
class Port:
    id: str
    project: str
    network_id: str
    domain_id: str | None
    nic: int
    mac: str
    ipv4: IPv4Address | None
    host: str | None
    vtep: str | None
    state: str
    seq: int
    created_at: float

    @classmethod
    def of(cls, row: Row[Any]) -> Port:
        m = row._mapping
        return cls(
            id=m["id"],
            project=m["project"],
            network_id=m["network_id"],
            domain_id=m["domain_id"],
            nic=m["nic"],
            mac=m["mac"],
            ipv4=IPv4Address(m["ipv4"]) if m["ipv4"] else None,
            host=m["host"],
            vtep=m["vtep"],
            state=m["state"],
            seq=m["seq"],
            created_at=m["created_at"],
        )

    def info(self, network: str) -> PortInfo:
        return PortInfo(
            port_id=uuid.UUID(self.id),
            project=self.project,
            network_id=uuid.UUID(self.network_id),
            network=network,
            domain_id=None if self.domain_id is None else uuid.UUID(self.domain_id),
            nic=self.nic,
            mac=self.mac,
            ipv4=self.ipv4,
            host=self.host,
            state=self.state,  # type: ignore[arg-type]
            seq=self.seq,
            created_at=self.created_at,
        )

    def event(self, kind: type[PortEvent], network: nets.Network, **extra: Any) -> PortEvent:
        return kind(
            port_id=uuid.UUID(self.id),
            network_id=uuid.UUID(self.network_id),
            domain_id=None if self.domain_id is None else uuid.UUID(self.domain_id),
            project=self.project,
            mac=self.mac,
            ipv4=self.ipv4,
            vni=network.vni,
            **extra,
        )


def of_domain(conn: Connection, domain_id: uuid.UUID) -> list[Port]:
    rows = conn.execute(
        sa.select(ports).where(ports.c.domain_id == str(domain_id)).order_by(ports.c.nic)
    )
    return [Port.of(r) for r in rows]


def _network_of(conn: Connection, port: Port) -> nets.Network:
    network = nets.get(conn, port.network_id)
    assert network is not None  # a foreign key
    return network


def allocate(
    conn: Connection, cmd: AllocatePorts, *, quota: NetworkQuota, now: float, quarantine_s: float
) -> tuple[list[PortBinding], list[PortEvent]]:
    """One port per NIC of the domain, or the ports it already has (then no events).

    Raises ServiceError `invalid` (no such network for the project, an address for a bridge
    network, an address outside the subnet), `conflict` (MAC or address taken, or the domain
    has other ports), `over_quota` or `no_capacity`, with `field` naming the NIC; nothing is
    written then."""
    existing = of_domain(conn, cmd.domain_id)
    if existing:
        return _same_ports(conn, cmd, existing), []
    # The project's allocations one at a time (PostgreSQL), so two cannot pass the quota
    # together; addresses and MACs need no lock (unique keys).
    advisory_xact_lock(conn, f"network-ports:{cmd.project}")
    used = conn.execute(
        sa.select(sa.func.count()).select_from(ports).where(ports.c.project == cmd.project)
    ).scalar_one()
    if used + len(cmd.nics) > quota.ports:
        raise ServiceError(
            "over_quota",
            f"quota for ports exceeded: {used} used + {len(cmd.nics)} > {quota.ports}",
            {
                "resource": "ports",
                "limit": quota.ports,
                "used": used,
                "requested": len(cmd.nics),
            },
        )
    bindings: list[PortBinding] = []
    events: list[PortEvent] = []
    for i, nic in enumerate(cmd.nics):
        network = nets.by_name(conn, nic.network, cmd.project)
        if network is None:
            raise ServiceError(
                "invalid",
                f"nics.{i}.network: no network named {nic.network!r} in project {cmd.project}",
                {"field": f"nics.{i}.network"},
            )
        port_id = str(uuid.uuid4())
        mac = _mac_for(conn, network, nic.mac, f"nics.{i}.mac")
        pool = network.pool()
        if pool is None:
            if nic.ip is not None:
                raise ServiceError(
                    "invalid",
                    f"nics.{i}.ip: network {network.name!r} is bridged to the host LAN, "
                    "whose DHCP gives addresses",
                    {"field": f"nics.{i}.ip"},
                )
            ip = None
        else:
            ip = ipam.allocate(
                conn,
                pool,
                port_id,
                now=now,
                quarantine_s=quarantine_s,
                wanted=nic.ip,
                field=f"nics.{i}.ip",
            )
        port = Port(
            id=port_id,
            project=cmd.project,
            network_id=network.id,
            domain_id=str(cmd.domain_id),
            nic=i,
            mac=mac,
            ipv4=ip,
            host=None,
            vtep=None,
            state="created",
            seq=1,
            created_at=now,
        )
        conn.execute(
            sa.insert(ports).values(
                id=port.id,
                project=port.project,
                network_id=port.network_id,
                domain_id=port.domain_id,
                nic=port.nic,
                mac=port.mac,
                ipv4=None if ip is None else str(ip),
                state=port.state,
                seq=port.seq,
                created_at=port.created_at,
            )
        )
        bindings.append(
            PortBinding(port_id=uuid.UUID(port_id), network=network.binding(), mac=mac, ipv4=ip)
        )
        events.append(port.event(PortCreated, network, seq=1))
    return bindings, events


def _same_ports(conn: Connection, cmd: AllocatePorts, existing: list[Port]) -> list[PortBinding]:
    """The bindings of the ports a domain has, if they are what `cmd` asks for."""
    bindings = []
    for i, port in enumerate(existing):
        network = _network_of(conn, port)
        bindings.append(
            PortBinding(
                port_id=uuid.UUID(port.id), network=network.binding(), mac=port.mac, ipv4=port.ipv4
            )
        )
        if i < len(cmd.nics):
            nic = cmd.nics[i]
            if (
                network.name == nic.network
                and nic.mac in (None, port.mac)
                and nic.ip in (None, port.ipv4)
            ):
                continue
        break
    else:
        if len(existing) == len(cmd.nics):
            return bindings
    raise ServiceError(
        "conflict",
        f"domain {cmd.domain_id} already has other ports: release them first",
        {"reason": "domain_has_ports"},
    )


def _mac_for(conn: Connection, network: nets.Network, wanted: str | None, field: str) -> str:
    def taken(mac: str) -> bool:
        return (
            conn.execute(
                sa.select(ports.c.id).where(ports.c.network_id == network.id, ports.c.mac == mac)
            ).first()
            is not None
        )

    if wanted is not None:
        if int(wanted[:2], 16) & 1 or wanted == "00:00:00:00:00:00":
            raise ServiceError(
                "invalid", f"{field}: {wanted} is not a unicast MAC address", {"field": field}
            )
        if taken(wanted):
            raise ServiceError(
                "conflict",
                f"{field}: {wanted} is in use on network {network.name!r}",
                {"field": field, "reason": "mac_in_use"},
            )
        return wanted
    while True:  # 2^24 per network: a collision is rare, two in a row rarer still
        mac = random_mac()
        if not taken(mac):
            return mac


def bind(conn: Connection, cmd: BindPorts) -> list[PortEvent]:
    """Record that the domain's ports live on `cmd.host` now; a `port.bound` event for each
    port that was not bound there already. Raises `not_found` if the domain has none."""
    found = of_domain(conn, cmd.domain_id)
    if not found:
        raise ServiceError("not_found", f"domain {cmd.domain_id} has no ports")
    vtep = None if cmd.vtep is None else str(cmd.vtep)
    events: list[PortEvent] = []
    for port in found:
        if (port.state, port.host, port.vtep) == ("bound", cmd.host, vtep):
            continue
        seq = port.seq + 1
        conn.execute(
            sa.update(ports)
            .where(ports.c.id == port.id)
            .values(state="bound", host=cmd.host, vtep=vtep, seq=seq)
        )
        events.append(
            port.event(PortBound, _network_of(conn, port), seq=seq, host=cmd.host, vtep=cmd.vtep)
        )
    return events


def bound_on(conn: Connection, network_ids: list[uuid.UUID]) -> list[PortBound]:
    """The bound ports of `network_ids` (unknown ids: none), each as its latest `port.bound`
    event, in one query."""
    if not network_ids:
        return []
    rows = conn.execute(
        sa.select(ports, networks.c.vni.label("network_vni"))
        .join(networks, networks.c.id == ports.c.network_id)
        .where(
            ports.c.network_id.in_([str(n) for n in network_ids]),
            ports.c.state == "bound",
            ports.c.host.is_not(None),
        )
        .order_by(ports.c.network_id, ports.c.id)
    )
    found = []
    for row in rows:
        port = Port.of(row)
        assert port.host is not None
        found.append(
            PortBound(
                port_id=uuid.UUID(port.id),
                network_id=uuid.UUID(port.network_id),
                domain_id=None if port.domain_id is None else uuid.UUID(port.domain_id),
                project=port.project,
                mac=port.mac,
                ipv4=port.ipv4,
                vni=row._mapping["network_vni"],
                seq=port.seq,
                host=port.host,
                vtep=None if port.vtep is None else IPv4Address(port.vtep),
            )
        )
    return found


def release(conn: Connection, domain_id: uuid.UUID, *, now: float) -> list[PortEvent]:
    """Delete the domain's ports (none: nothing to do) and quarantine their addresses."""
    events: list[PortEvent] = []
    for port in of_domain(conn, domain_id):
        network = _network_of(conn, port)
        ipam.release(conn, port.id, now=now)
        conn.execute(sa.delete(ports).where(ports.c.id == port.id))
        events.append(port.event(PortDeleted, network, seq=port.seq + 1, host=port.host))
    return events


def listing(
    conn: Connection,
    project: str | None,
    network_id: uuid.UUID | None = None,
    domain_id: uuid.UUID | None = None,
) -> list[PortInfo]:
    query = sa.select(ports).order_by(ports.c.domain_id, ports.c.nic, ports.c.id)
    if project is not None:
        query = query.where(ports.c.project == project)
    if network_id is not None:
        nets.visible(conn, network_id, project)
        query = query.where(ports.c.network_id == str(network_id))
    if domain_id is not None:
        query = query.where(ports.c.domain_id == str(domain_id))
    names = {r[0]: r[1] for r in conn.execute(sa.select(networks.c.id, networks.c.name))}
    return [(p := Port.of(r)).info(names.get(p.network_id, "")) for r in conn.execute(query)]


def one(conn: Connection, port_id: uuid.UUID, project: str | None) -> PortInfo:
    row = conn.execute(sa.select(ports).where(ports.c.id == str(port_id))).first()
    if row is None or (project is not None and row._mapping["project"] != project):
        raise ServiceError("not_found", f"port {port_id} not found")
    port = Port.of(row)
    return port.info(_network_of(conn, port).name)


def leases(conn: Connection, network_id: uuid.UUID, project: str | None) -> list[DhcpLease]:
    """The static DHCP entries of a network's ports (a member's own ports only)."""
    nets.visible(conn, network_id, project)
    return [
        DhcpLease(
            mac=p.mac,
            ipv4=p.ipv4,
            port_id=p.port_id,
            domain_id=p.domain_id,
            host=p.host,
        )
        for p in listing(conn, project, network_id)
        if p.ipv4 is not None
    ]
