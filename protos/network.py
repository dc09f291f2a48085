"""The network service's wire contract with the scheduler and compute nodes (queue `network`).

The scheduler allocates a domain's ports before it asks a host (idempotent by domain: a retry
on another host gets the same ports), binds them to the host that took the domain, and
releases them when placement fails or the domain is deleted. Port events carry what other
hosts need for l2population: the port's MAC and address and the underlay address (`vtep`) of
the host it is bound to. The network service's own API-facing commands live beside it.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address
from typing import ClassVar

from pydantic import Field

from protos.base import Message
from protos.bindings import MAC_WIRE_PATTERN, PortBinding
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
