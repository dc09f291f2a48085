"""The HTTP API's request and response bodies (the wire models stay in protos/)."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat

from protos.commands import RebootMode, ShutdownMode
from protos.domain import NAME_PATTERN, DomainSpec, Fault, PowerState, TaskState
from protos.host import KvmKind, Resources
from protos.scheduler import Attempt
from services.api.config import Quota, Role
from services.api.registry.domains import DomainRecord
from services.api.visibility import HostMask


class DomainCreate(DomainSpec):
    """A domain spec (protos.domain.DomainSpec) plus whether to start it once defined."""

    start: StrictBool = True


class DomainInterface(BaseModel):
    """A NIC of a domain as its port says (virsh domiflist): MAC, address, network."""

    nic: int
    network: str
    network_id: uuid.UUID
    port_id: uuid.UUID
    mac: str
    ipv4: str | None


class DomainView(BaseModel):
    """A domain as the caller may see it: `host` (also in `fault` and `attempts`) is the host's
    name for an admin, and for a member an alias (`host-…`) stable within its project."""

    id: uuid.UUID
    name: str
    project: str
    host: str | None
    state: PowerState
    task: TaskState
    seq: int
    fault: Fault | None
    vcpus: int
    memory_mib: int
    spec: DomainSpec
    created_at: float
    updated_at: float
    attempts: list[Attempt] = []
    # GET /v1/domains/{id} of a domain with NICs: each NIC's port, from the network service
    # (null when it did not answer, or not asked).
    interfaces: list[DomainInterface] | None = None

    @classmethod
    def of(
        cls, record: DomainRecord, mask: HostMask, attempts: list[Attempt] | None = None
    ) -> DomainView:
        """The view of `record` for the caller `mask` stands for (members see host aliases)."""
        host = mask.name(record.host)  # first: the free text below may name the same host
        fault = record.fault
        if fault is not None and mask.active:
            fault = Fault(
                code=fault.code, message=mask.text(fault.message), host=mask.name(fault.host)
            )
        if attempts and mask.active:
            attempts = [
                Attempt(host=mask.name(a.host) or "", code=a.code, message=mask.text(a.message))
                for a in attempts
            ]
        return cls(
            id=record.id,
            name=record.name,
            project=record.project,
            host=host,
            state=record.power,
            task=record.task,
            seq=record.seq,
            fault=fault,
            vcpus=record.spec.vcpus,
            memory_mib=record.spec.memory_mib,
            spec=record.spec,
            created_at=record.created_at,
            updated_at=record.updated_at,
            attempts=attempts or [],
        )


class DomainList(BaseModel):
    domains: list[DomainView]


class ActionName(StrEnum):
    START = "start"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    REBOOT = "reboot"
    PAUSE = "pause"
    RESUME = "resume"


class ActionRequest(BaseModel):
    """`action` and its options: `paused` (start), `mode` (shutdown: ctrl-alt-del|acpi;
    reboot: reset|ctrl-alt-del), `force` and `timeout_s` (shutdown: destroy after the timeout),
    `wait` (shutdown: answer only once the guest is off)."""

    model_config = ConfigDict(extra="forbid")
    action: ActionName
    paused: StrictBool = False
    mode: str | None = Field(default=None, pattern=r"^(acpi|ctrl-alt-del|reset)$")
    force: StrictBool = False
    timeout_s: StrictFloat = Field(default=60.0, gt=0, le=3600)
    wait: StrictBool = False

    def shutdown_mode(self) -> ShutdownMode:
        return (
            ShutdownMode(self.mode)
            if self.mode in ("acpi", "ctrl-alt-del")
            else (ShutdownMode.CTRL_ALT_DEL)
        )

    def reboot_mode(self) -> RebootMode:
        return (
            RebootMode(self.mode) if self.mode in ("reset", "ctrl-alt-del") else (RebootMode.RESET)
        )


class ConsoleLog(BaseModel):
    domain_id: uuid.UUID
    data: str
    truncated: bool


class HostView(BaseModel):
    name: str
    state: Literal["up", "down"]
    enabled: bool
    kvm: KvmKind
    version: str
    capacity: Resources
    usage: Resources
    cpu_allocation_ratio: float
    ram_allocation_ratio: float
    max_vcpus_per_domain: int
    domains_by_state: dict[str, int]
    last_seen: float
    seconds_since_heartbeat: float
    # The host's VXLAN underlay address, and what there would break guest networking (e.g.
    # another firewall manager's forward chain with policy drop in front of NAT).
    vtep: str | None = None
    network_warnings: list[str] = []
    # The names of the host's `dir` (host-local) pools, as its heartbeat says; None from a host
    # whose heartbeat does not say (HostHeartbeat before 1.3).
    pools: list[str] | None = None


class HostList(BaseModel):
    hosts: list[HostView]


class HostEnable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=255)


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(pattern=NAME_PATTERN)
    role: Role = Role.MEMBER
    description: str = Field(default="", max_length=255)


class TokenView(BaseModel):
    id: str
    project: str
    role: Role
    description: str
    created_at: float


class TokenCreated(TokenView):
    token: str = Field(description="the secret: shown once, only its digest is stored")


class TokenList(BaseModel):
    tokens: list[TokenView]


class ProjectView(BaseModel):
    project: str
    quota: Quota
    usage: dict[str, int]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    broker: bool
    details: dict[str, Any] = {}
