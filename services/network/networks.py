"""Networks in the catalog: create (checked whole before anything is written), delete, read.

A member sees its own project's networks and the shared ones; anything else is `not_found`,
exactly as if it did not exist. Every subnet of a nat or isolated network is unique across
all projects: each host puts the gateway of every network it carries on a bridge in its own
namespace, so two overlapping subnets on one host would break both, and any network may
reach any host.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from compute_node.net.models import overlay_mtu
from protos.bindings import NetworkBinding
from protos.network import CreateNetwork, NetworkCreated, NetworkDeleted, NetworkInfo
from services.bus import ServiceError
from services.db import advisory_xact_lock
from services.network import ipam
from services.network.config import NetworkQuota
from services.network.tables import SUBNETS_LOCK, networks, ports

MAX_VNI = (1 << 24) - 1
# Smallest subnet: the gateway and one guest (as the plumbing's rule: /30 or wider).
MAX_PREFIXLEN = 30


@dataclass(frozen=True, slots=True)
class Network:
    """A network row, typed."""

    id: str
    project: str
    name: str
    mode: str
    subnet: IPv4Network | None
    gateway: IPv4Address | None
    mtu: int
    vni: int | None
    dhcp: bool
    host_bridge: str | None
    shared: bool
    seq: int
    created_at: float

    @classmethod
    def of(cls, row: Row[Any]) -> Network:
        m = row._mapping
        return cls(
            id=m["id"],
            project=m["project"],
            name=m["name"],
            mode=m["mode"],
            subnet=IPv4Network(m["subnet"]) if m["subnet"] else None,
            gateway=IPv4Address(m["gateway"]) if m["gateway"] else None,
            mtu=m["mtu"],
            vni=m["vni"],
            dhcp=bool(m["dhcp"]),
            host_bridge=m["host_bridge"],
            shared=bool(m["shared"]),
            seq=m["seq"],
            created_at=m["created_at"],
        )

    def visible_to(self, project: str | None) -> bool:
        return project is None or self.shared or self.project == project

    def pool(self) -> ipam.Pool | None:
        if self.subnet is None or self.gateway is None:
            return None
        return ipam.Pool(self.id, self.subnet, self.gateway)

    def info(self, port_count: int = 0) -> NetworkInfo:
        return NetworkInfo(
            network_id=uuid.UUID(self.id),
            project=self.project,
            name=self.name,
            mode=self.mode,  # type: ignore[arg-type]
            subnet=self.subnet,
            gateway=self.gateway,
            mtu=self.mtu,
            vni=self.vni,
            dhcp=self.dhcp,
            host_bridge=self.host_bridge,
            shared=self.shared,
            ports=port_count,
            seq=self.seq,
            created_at=self.created_at,
        )

    def binding(self) -> NetworkBinding:
        gateway = None
        if self.gateway is not None and self.subnet is not None:
            gateway = IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")
        return NetworkBinding(
            network_id=uuid.UUID(self.id),
            name=self.name,
            mode=self.mode,  # type: ignore[arg-type]
            mtu=self.mtu,
            gateway=gateway,
            dhcp=self.dhcp,
            host_bridge=self.host_bridge,
            vni=self.vni,
        )

    def event(self, kind: type[NetworkCreated] | type[NetworkDeleted], seq: int) -> Any:
        return kind(
            network_id=uuid.UUID(self.id),
            project=self.project,
            name=self.name,
            mode=self.mode,  # type: ignore[arg-type]
            subnet=self.subnet,
            vni=self.vni,
            seq=seq,
        )


def _invalid(field: str, message: str) -> ServiceError:
    return ServiceError("invalid", f"{field}: {message}", {"field": field})


def check_subnet(subnet: IPv4Network) -> None:
    """Raise `invalid` for a subnet no network may have."""
    if subnet.prefixlen > MAX_PREFIXLEN:
        raise _invalid(
            "subnet",
            f"{subnet} is too small: a network needs /{MAX_PREFIXLEN} or wider (a gateway "
            "and at least one guest)",
        )
    for what, bad in (
        ("loopback", subnet.is_loopback),
        ("link-local", subnet.is_link_local),
        ("multicast", subnet.is_multicast),
        ("unspecified (0.0.0.0/8)", subnet.overlaps(IPv4Network("0.0.0.0/8"))),
        ("reserved (240.0.0.0/4)", subnet.is_reserved),
    ):
        if bad:
            raise _invalid("subnet", f"{subnet} is {what} address space")


def _shape(cmd: CreateNetwork, underlay_mtu: int) -> tuple[IPv4Address | None, int]:
    """The gateway and MTU of the network `cmd` asks for; `invalid` for any inconsistency."""
    max_mtu = overlay_mtu(underlay_mtu, vxlan=cmd.mode != "bridge")
    if cmd.mtu is not None and cmd.mtu > max_mtu:
        raise _invalid("mtu", f"{cmd.mtu} is above {max_mtu}, what the underlay carries")
    mtu = cmd.mtu or max_mtu
    if cmd.mode == "bridge":
        if cmd.host_bridge is None:
            raise _invalid("host_bridge", "a bridge-mode network names an existing host bridge")
        for field, value in (("subnet", cmd.subnet), ("gateway", cmd.gateway)):
            if value is not None:
                raise _invalid(field, "a bridge-mode network's addresses are the host LAN's")
        if cmd.dhcp:
            raise _invalid("dhcp", "a bridge-mode network's DHCP is the host LAN's: give false")
        return None, mtu
    if cmd.host_bridge is not None:
        raise _invalid("host_bridge", f"only a bridge-mode network has one, not {cmd.mode}")
    if cmd.subnet is None:
        raise _invalid("subnet", f"a {cmd.mode} network needs a subnet, e.g. 10.0.0.0/24")
    check_subnet(cmd.subnet)
    gateway = cmd.gateway or next(cmd.subnet.hosts())
    if gateway not in cmd.subnet or gateway in (
        cmd.subnet.network_address,
        cmd.subnet.broadcast_address,
    ):
        raise _invalid("gateway", f"{gateway} is not a host address of {cmd.subnet}")
    return gateway, mtu


def get(conn: Connection, network_id: uuid.UUID | str) -> Network | None:
    row = conn.execute(sa.select(networks).where(networks.c.id == str(network_id))).first()
    return None if row is None else Network.of(row)


def visible(conn: Connection, network_id: uuid.UUID, project: str | None) -> Network:
    """The network if `project` (None: an admin) may see it; `not_found` otherwise."""
    network = get(conn, network_id)
    if network is None or not network.visible_to(project):
        raise ServiceError("not_found", f"network {network_id} not found")
    return network


def by_name(conn: Connection, name: str, project: str) -> Network | None:
    """`project`'s network called `name`, else a shared one of that name."""
    rows = conn.execute(
        sa.select(networks)
        .where(
            networks.c.name == name,
            sa.or_(networks.c.project == project, networks.c.shared.is_(True)),
        )
        .order_by((networks.c.project == project).desc(), networks.c.created_at)
    ).all()
    return Network.of(rows[0]) if rows else None


def port_counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        sa.select(ports.c.network_id, sa.func.count()).group_by(ports.c.network_id)
    ).all()
    return {r[0]: int(r[1]) for r in rows}


def listing(conn: Connection, project: str | None) -> list[NetworkInfo]:
    query = sa.select(networks).order_by(networks.c.project, networks.c.name)
    if project is not None:
        query = query.where(sa.or_(networks.c.project == project, networks.c.shared.is_(True)))
    counts = port_counts(conn)
    return [(n := Network.of(r)).info(counts.get(n.id, 0)) for r in conn.execute(query)]


def create(
    conn: Connection, cmd: CreateNetwork, *, underlay_mtu: int, quota: NetworkQuota, now: float
) -> tuple[Network, NetworkCreated | None]:
    """Insert the network `cmd` describes and return it with its `network.created` event;
    the same network and no event when `cmd` was already carried out (a retry). Raises
    ServiceError `invalid`, `conflict` (name_in_use, subnet_overlap) or `over_quota`;
    nothing is written then."""
    existing = get(conn, cmd.network_id)
    if existing is not None:
        if (existing.project, existing.name) == (cmd.project, cmd.name):
            return existing, None
        raise ServiceError("conflict", f"network id {cmd.network_id} is taken")
    gateway, mtu = _shape(cmd, underlay_mtu)
    # One network create at a time (PostgreSQL; SQLite's write lock does it already): the
    # name, quota and overlap checks and the VNI choice see every network committed before.
    advisory_xact_lock(conn, SUBNETS_LOCK)
    taken = conn.execute(
        sa.select(networks.c.id).where(
            networks.c.project == cmd.project, networks.c.name == cmd.name
        )
    ).first()
    if taken is not None:
        raise ServiceError(
            "conflict",
            f"a network named {cmd.name!r} exists in project {cmd.project}",
            {"field": "name", "reason": "name_in_use"},
        )
    used = conn.execute(
        sa.select(sa.func.count()).select_from(networks).where(networks.c.project == cmd.project)
    ).scalar_one()
    if used + 1 > quota.networks:
        raise ServiceError(
            "over_quota",
            f"quota for networks exceeded: {used} used + 1 > {quota.networks}",
            {"resource": "networks", "limit": quota.networks, "used": used, "requested": 1},
        )
    vni = None
    if cmd.subnet is not None:
        _check_overlap(conn, cmd.subnet, cmd.project)
    if cmd.mode != "bridge":
        vni = _free_vni(conn)
    network = Network(
        id=str(cmd.network_id),
        project=cmd.project,
        name=cmd.name,
        mode=cmd.mode,
        subnet=cmd.subnet,
        gateway=gateway,
        mtu=mtu,
        vni=vni,
        dhcp=cmd.dhcp,
        host_bridge=cmd.host_bridge,
        shared=cmd.shared,
        seq=1,
        created_at=now,
    )
    conn.execute(
        sa.insert(networks).values(
            id=network.id,
            project=network.project,
            name=network.name,
            mode=network.mode,
            subnet=None if network.subnet is None else str(network.subnet),
            gateway=None if network.gateway is None else str(network.gateway),
            mtu=network.mtu,
            vni=network.vni,
            dhcp=network.dhcp,
            host_bridge=network.host_bridge,
            shared=network.shared,
            seq=network.seq,
            created_at=network.created_at,
        )
    )
    return network, network.event(NetworkCreated, 1)


def _check_overlap(conn: Connection, subnet: IPv4Network, project: str) -> None:
    rows = conn.execute(
        sa.select(networks.c.project, networks.c.name, networks.c.subnet).where(
            networks.c.subnet.is_not(None)
        )
    ).all()
    for other_project, name, text in rows:
        other = IPv4Network(text)
        if not subnet.overlaps(other):
            continue
        if other_project == project:
            message = f"{subnet} overlaps {other}, the subnet of network {name!r}"
        else:
            # Another tenant's network: say that the range is taken, not whose it is.
            message = f"{subnet} overlaps a subnet in use on the hosts' networks ({other})"
        raise ServiceError("conflict", message, {"field": "subnet", "reason": "subnet_overlap"})


def _free_vni(conn: Connection) -> int:
    highest = conn.execute(sa.select(sa.func.max(networks.c.vni))).scalar()
    if highest is None or highest < MAX_VNI:
        return (highest or 0) + 1
    used = set(conn.execute(sa.select(networks.c.vni).where(networks.c.vni.is_not(None))).scalars())
    for vni in range(1, MAX_VNI + 1):
        if vni not in used:
            return vni
    raise ServiceError("no_capacity", "every VXLAN network id is in use")


def delete(
    conn: Connection, network_id: uuid.UUID, project: str | None
) -> tuple[Network, NetworkDeleted]:
    """Remove a network with no ports. Raises ServiceError `not_found`, `forbidden` (a shared
    network of another project) or `conflict` (reason `has_ports`)."""
    network = visible(conn, network_id, project)
    if project is not None and network.project != project:
        raise ServiceError(
            "forbidden", f"network {network.name!r} is shared: only an admin deletes it"
        )
    count = conn.execute(
        sa.select(sa.func.count()).select_from(ports).where(ports.c.network_id == network.id)
    ).scalar_one()
    if count:
        raise ServiceError(
            "conflict",
            f"network {network.name!r} has {count} port(s): delete their domains first",
            {"reason": "has_ports", "ports": count},
        )
    ipam.forget_network(conn, network.id)
    conn.execute(sa.delete(networks).where(networks.c.id == network.id))
    return network, network.event(NetworkDeleted, network.seq + 1)
