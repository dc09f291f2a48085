"""/v1/networks and /v1/ports: the network service's catalog, through the `network` queue.

A member works in its own project (and sees the shared networks); an admin sees every
project's. Another project's network or port is 404, exactly as one that does not exist.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Literal, TypeVar

import structlog
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from protos import routing
from protos.base import Message
from protos.commands import Command
from protos.domain import NAME_PATTERN, NOT_BOOL_OR_TEXT
from protos.network import (
    CreateNetwork,
    DeleteNetwork,
    DhcpLeases,
    GetNetwork,
    GetPort,
    ListDhcpLeases,
    ListNetworks,
    ListPorts,
    NetworkInfo,
    NetworkList,
    PortInfo,
    PortList,
)
from protos.replies import Done
from services.api.auth import Principal
from services.api.context import ApiContext
from services.api.models import DomainInterface
from services.api.problems import Problem, responses
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.visibility import HostMask

log = structlog.get_logger("flotilla.api")
networks_router = APIRouter(prefix="/v1/networks", tags=["networks"])
ports_router = APIRouter(prefix="/v1/ports", tags=["ports"])
M = TypeVar("M", bound=Message)

# The network service's refusals that mean something else over HTTP than a compute node's.
_STATUS = {"not_found": 404, "over_quota": 403, "forbidden": 403, "no_capacity": 409}
# A domain's view waits this long for its NICs' ports, then shows it without them.
INTERFACES_TIMEOUT_S = 3.0


class NetworkCreate(BaseModel):
    """A network: `nat` (the default) or `isolated` with a `subnet`, or `bridge` onto an
    existing `host_bridge` (no subnet, `dhcp: false`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    mode: Literal["nat", "isolated", "bridge"] = "nat"
    subnet: IPv4Network | None = Field(default=None, examples=["10.0.0.0/24"])
    gateway: IPv4Address | None = Field(default=None, description="default: the first address")
    # An integer as JSON Schema means it (1500 or 1500.0, never "1500"), as everywhere.
    mtu: Annotated[int, Field(ge=576, le=65535), NOT_BOOL_OR_TEXT] | None = Field(
        default=None, description="default: the underlay's less VXLAN's 50"
    )
    dhcp: StrictBool = True
    host_bridge: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    shared: StrictBool = Field(default=False, description="usable by every project (admin only)")


def _scope(caller: Principal) -> str | None:
    return None if caller.is_admin else caller.project


def _call(ctx: ApiContext, command: Command, result: type[M], timeout: float | None = None) -> M:
    try:
        answer = ctx.call(routing.NETWORK_QUEUE, command, timeout)
    except Problem as problem:
        if problem.code in _STATUS:
            problem.status = _STATUS[problem.code]
            problem.title = HTTPStatus(problem.status).phrase
        raise
    assert isinstance(answer, result)
    return answer


def domain_interfaces(ctx: ApiContext, domain_id: uuid.UUID) -> list[DomainInterface] | None:
    """The domain's NICs as its ports say, or None when the network service cannot say now
    (a domain's view does not fail for that). The caller has checked the domain is visible."""
    try:
        found = _call(
            ctx, ListPorts(project=None, domain_id=domain_id), PortList, INTERFACES_TIMEOUT_S
        )
    except Problem as problem:
        log.warning("ports of a domain unavailable", domain_id=str(domain_id), error=problem.detail)
        return None
    return [
        DomainInterface(
            nic=p.nic,
            network=p.network,
            network_id=p.network_id,
            port_id=p.port_id,
            mac=p.mac,
            ipv4=None if p.ipv4 is None else str(p.ipv4),
        )
        for p in found.ports
    ]


def _masked(port: PortInfo, mask: HostMask) -> PortInfo:
    return port.model_copy(update={"host": mask.name(port.host)}) if mask.active else port


@networks_router.post(
    "",
    status_code=201,
    response_model=NetworkInfo,
    responses=responses(401, 403, 409, 422, 503, 504),
)
def create_network(
    body: NetworkCreate, ctx: Ctx, caller: Caller, response: Response
) -> NetworkInfo:
    """Create a network in the caller's project. 422 (with `field`) for a bad subnet,
    gateway, MTU or mode combination; 409 `conflict` for a name in use or a subnet that
    overlaps another network's (`reason`); 403 over quota. Nothing is created on a refusal."""
    if body.shared and not caller.is_admin:
        raise Problem(403, "forbidden", "shared: only an admin makes a shared network")
    command = CreateNetwork(
        network_id=uuid.uuid4(), project=caller.project, **body.model_dump(exclude_none=True)
    )
    info = _call(ctx, command, NetworkInfo)
    response.headers["Location"] = f"/v1/networks/{info.network_id}"
    return info


@networks_router.get("", response_model=NetworkList, responses=responses(401, 503, 504))
def list_networks(ctx: Ctx, caller: Caller) -> NetworkList:
    """The caller's project's networks and the shared ones (an admin: every network)."""
    return _call(ctx, ListNetworks(project=_scope(caller)), NetworkList)


@networks_router.get(
    "/{network_id}", response_model=NetworkInfo, responses=responses(401, 404, 422, 503, 504)
)
def get_network(network_id: uuid.UUID, ctx: Ctx, caller: Caller) -> NetworkInfo:
    return _call(ctx, GetNetwork(network_id=network_id, project=_scope(caller)), NetworkInfo)


@networks_router.delete(
    "/{network_id}",
    status_code=204,
    response_class=Response,
    responses=responses(401, 403, 404, 409, 422, 503, 504),
)
def delete_network(network_id: uuid.UUID, ctx: Ctx, caller: Caller) -> Response:
    """Delete a network: 409 (`reason` `has_ports`) while any port is on it; 403 for a
    shared network unless admin."""
    _call(ctx, DeleteNetwork(network_id=network_id, project=_scope(caller)), Done)
    return Response(status_code=204)


@networks_router.get(
    "/{network_id}/dhcp-leases",
    response_model=DhcpLeases,
    responses=responses(401, 404, 422, 503, 504),
)
def dhcp_leases(network_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> DhcpLeases:
    """The network's static DHCP entries (MAC → address), one per port (a member's own)."""
    leases = _call(ctx, ListDhcpLeases(network_id=network_id, project=_scope(caller)), DhcpLeases)
    if not mask.active:
        return leases
    masked = [lease.model_copy(update={"host": mask.name(lease.host)}) for lease in leases.leases]
    return leases.model_copy(update={"leases": masked})


@ports_router.get("", response_model=PortList, responses=responses(401, 404, 422, 503, 504))
def list_ports(
    *,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    network: Annotated[uuid.UUID | None, Query(description="only this network's")] = None,
    domain: Annotated[uuid.UUID | None, Query(description="only this domain's")] = None,
) -> PortList:
    """The caller's ports (an admin: every port), by network or domain."""
    found = _call(
        ctx,
        ListPorts(project=_scope(caller), network_id=network, domain_id=domain),
        PortList,
    )
    return PortList(ports=[_masked(p, mask) for p in found.ports])


@ports_router.get(
    "/{port_id}", response_model=PortInfo, responses=responses(401, 404, 422, 503, 504)
)
def get_port(port_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> PortInfo:
    return _masked(_call(ctx, GetPort(port_id=port_id, project=_scope(caller)), PortInfo), mask)
