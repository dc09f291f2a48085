"""The network service's wire contract with the scheduler and compute nodes (queue `network`).

The scheduler allocates a domain's ports before it asks a host (idempotent by domain: a retry
on another host gets the same ports), binds them to the host that took the domain, and
releases them when placement fails or the domain is deleted. Port events carry what other
hosts need for l2population: the port's MAC and address and the underlay address (`vtep`) of
the host it is bound to. The network service's own API-facing commands live beside it.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from protos import routing
from protos.base import Message
from protos.bindings import MAC_WIRE_PATTERN, NetworkModeName, PortBinding
from protos.commands import Command
from protos.domain import NAME_PATTERN, NicSpec
from protos.replies import Done


class PortBindings(Message):
    TYPE = "reply.port_bindings"
    ports: list[PortBinding]


class AllocatePorts(Command):
    """One port per NIC of domain `domain_id`, in order; asking again for the same domain
    returns the same ports (a MAC or address named in a NicSpec is honoured or refused)."""

    TYPE = "cmd.network.ports_allocate"
    RESULT = PortBindings
    domain_id: uuid.UUID
    project: str = Field(pattern=NAME_PATTERN)
    nics: list[NicSpec] = Field(max_length=8)


class BindPorts(Command):
    """The domain's ports now live on `host`, whose underlay address for VXLAN is `vtep`
    (from its heartbeat; announced as `port.bound`)."""

    TYPE = "cmd.network.ports_bind"
    RESULT = Done
    domain_id: uuid.UUID
    host: str = Field(pattern=NAME_PATTERN)
    vtep: IPv4Address | None = None


class ReleasePorts(Command):
    """Delete the domain's ports; their addresses are quarantined before reuse."""

    TYPE = "cmd.network.ports_release"
    RESULT = Done
    domain_id: uuid.UUID


SCHEDULER_NETWORK_COMMANDS: tuple[type[Command], ...] = (AllocatePorts, BindPorts, ReleasePorts)


class PortEvent(Message):
    """Fields common to port events; `seq` grows per port."""

    EVENT: ClassVar[str] = ""
    port_id: uuid.UUID
    network_id: uuid.UUID
    domain_id: uuid.UUID | None = None
    project: str
    mac: str = Field(pattern=MAC_WIRE_PATTERN)
    ipv4: IPv4Address | None = None
    vni: int | None = None
    seq: int = Field(ge=1)

    def routing_key(self) -> str:
        return f"port.{self.EVENT}.{self.port_id}"

    def extra_routing_keys(self) -> list[str]:
        """The keys the event is also routed by (RabbitMQ's BCC header; a queue matched by
        several keys gets one copy): its network's, to which a compute node binds its port
        queue for each network it carries (`routing.network_ports_pattern`)."""
        return [routing.network_ports_key(self.EVENT, str(self.network_id))]


class PortCreated(PortEvent):
    TYPE = "port.created"
    EVENT = "created"


class PortBound(PortEvent):
    """The port lives on `host`, whose underlay address for VXLAN is `vtep`."""

    TYPE = "port.bound"
    EVENT = "bound"
    host: str
    vtep: IPv4Address | None = None


class PortDeleted(PortEvent):
    TYPE = "port.deleted"
    EVENT = "deleted"
    host: str | None = None


PORT_EVENTS: tuple[type[PortEvent], ...] = (PortCreated, PortBound, PortDeleted)


class BoundPorts(Message):
    TYPE = "reply.bound_ports"
    ports: list[PortBound]


class ListBoundPorts(Command):
    """The ports bound to a host on networks `network_ids`, each as its latest `port.bound`
    event (same `seq`): what a compute node that starts, reconnects or first carries a
    network needs for its forwarding entries (l2population), whatever events it missed."""

    TYPE = "cmd.network.bound_ports"
    RESULT = BoundPorts
    network_ids: list[uuid.UUID] = Field(max_length=4096)


HOST_NETWORK_COMMANDS: tuple[type[Command], ...] = (ListBoundPorts,)


# ---- the tenant-facing commands (from the API) --------------------------------------------
#
# `project` is the caller's project, or None for an admin (who sees every project's). A
# network of another project is `not_found` to a member, as if it did not exist; a `shared`
# network (the `default` one of `flotilla up`) is visible to every project and usable by
# every project's NICs, but only an admin deletes it.

ProjectScope = Annotated[str | None, Field(default=None, pattern=NAME_PATTERN)]


class NetworkInfo(Message):
    """A network: `subnet`/`gateway` None only in bridge mode, `vni` its VXLAN id (None in
    bridge mode), `ports` how many ports it has."""

    TYPE = "reply.network_info"
    network_id: uuid.UUID
    project: str
    name: str
    mode: NetworkModeName
    subnet: IPv4Network | None = None
    gateway: IPv4Address | None = None
    mtu: int
    vni: int | None = None
    dhcp: bool
    host_bridge: str | None = None
    shared: bool = False
    ports: int = Field(default=0, ge=0)
    seq: int = Field(ge=0)
    created_at: float


class NetworkList(Message):
    TYPE = "reply.network_list"
    networks: list[NetworkInfo]


PortStateName = Literal["created", "bound"]


class PortInfo(Message):
    """A port: NIC `nic` (its index in the domain's spec) of `domain_id` on `network_id`;
    `host` once bound."""

    TYPE = "reply.port_info"
    port_id: uuid.UUID
    project: str
    network_id: uuid.UUID
    network: str
    domain_id: uuid.UUID | None = None
    nic: int = Field(ge=0)
    mac: str = Field(pattern=MAC_WIRE_PATTERN)
    ipv4: IPv4Address | None = None
    host: str | None = None
    state: PortStateName
    seq: int = Field(ge=0)
    created_at: float


class PortList(Message):
    TYPE = "reply.port_list"
    ports: list[PortInfo]


class DhcpLease(BaseModel):
    """A static DHCP entry: what dnsmasq hands `mac` on every host of the network."""

    model_config = ConfigDict(frozen=True)
    mac: str
    ipv4: IPv4Address
    port_id: uuid.UUID
    domain_id: uuid.UUID | None = None
    host: str | None = None


class DhcpLeases(Message):
    TYPE = "reply.dhcp_leases"
    network_id: uuid.UUID
    leases: list[DhcpLease]


class CreateNetwork(Command):
    """A new network `network_id` (chosen by the caller, so a retry finds it). `subnet` is
    required for nat and isolated, refused for bridge (which names `host_bridge`);
    `gateway` defaults to the subnet's first address, `mtu` to the underlay's less VXLAN's
    overhead (a smaller one may be asked). Only an admin's network may be `shared`."""

    TYPE = "cmd.network.create"
    RESULT = NetworkInfo
    network_id: uuid.UUID
    project: str = Field(pattern=NAME_PATTERN)
    name: str = Field(pattern=NAME_PATTERN)
    mode: NetworkModeName = "nat"
    subnet: IPv4Network | None = None
    gateway: IPv4Address | None = None
    mtu: int | None = Field(default=None, ge=576, le=65535)
    dhcp: bool = True
    host_bridge: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    shared: bool = False


class DeleteNetwork(Command):
    """Delete a network; refused (`conflict`, reason `has_ports`) while it has ports."""

    TYPE = "cmd.network.delete"
    RESULT = Done
    network_id: uuid.UUID
    project: ProjectScope


class GetNetwork(Command):
    TYPE = "cmd.network.get"
    RESULT = NetworkInfo
    network_id: uuid.UUID
    project: ProjectScope


class ListNetworks(Command):
    """The project's networks and the shared ones (an admin's: every network)."""

    TYPE = "cmd.network.list"
    RESULT = NetworkList
    project: ProjectScope


class ListPorts(Command):
    TYPE = "cmd.network.port_list"
    RESULT = PortList
    project: ProjectScope
    network_id: uuid.UUID | None = None
    domain_id: uuid.UUID | None = None


class GetPort(Command):
    TYPE = "cmd.network.port_get"
    RESULT = PortInfo
    port_id: uuid.UUID
    project: ProjectScope


class ListDhcpLeases(Command):
    """The static DHCP entries of a network (a member sees only its own project's ports on a
    shared network)."""

    TYPE = "cmd.network.dhcp_leases"
    RESULT = DhcpLeases
    network_id: uuid.UUID
    project: ProjectScope


TENANT_NETWORK_COMMANDS: tuple[type[Command], ...] = (
    CreateNetwork,
    DeleteNetwork,
    GetNetwork,
    ListNetworks,
    ListPorts,
    GetPort,
    ListDhcpLeases,
)


# ---- network events ------------------------------------------------------------------------


class NetworkEvent(Message):
    """Fields common to network events; `seq` grows per network."""

    EVENT: ClassVar[str] = ""
    network_id: uuid.UUID
    project: str
    name: str
    mode: NetworkModeName
    subnet: IPv4Network | None = None
    vni: int | None = None
    seq: int = Field(ge=1)

    def routing_key(self) -> str:
        return f"network.{self.EVENT}.{self.network_id}"


class NetworkCreated(NetworkEvent):
    TYPE = "network.created"
    EVENT = "created"


class NetworkDeleted(NetworkEvent):
    TYPE = "network.deleted"
    EVENT = "deleted"


NETWORK_EVENTS: tuple[type[NetworkEvent], ...] = (NetworkCreated, NetworkDeleted)
