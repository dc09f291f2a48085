"""Host inventory and the heartbeat each compute node publishes every few seconds."""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Address

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
from protos.domain import PowerState
from protos.routing import event_key


class KvmKind(StrEnum):
    HARDWARE = "hardware"  # vmx/svm: guests run at full speed in every ring
    PVM = "pvm"  # pagetable-based KVM: guest ring 0 is emulated, ring 3 native
    NONE = "none"  # no usable /dev/kvm: only the fake driver runs here


class Resources(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    vcpus: int = Field(ge=0)
    memory_mib: int = Field(ge=0)
    disk_gib: int = Field(default=0, ge=0)


class HostInventory(BaseModel):
    """What a host offers: physical capacity and the overcommit ratios it applies."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    capacity: Resources
    cpu_allocation_ratio: float = Field(default=4.0, gt=0)
    ram_allocation_ratio: float = Field(default=1.0, gt=0)
    disk_allocation_ratio: float = Field(default=1.0, gt=0)
    kvm: KvmKind
    max_vcpus_per_domain: int = Field(default=1, ge=1)
    # The host's VXLAN underlay address (the scheduler binds ports with it), if it has one.
    vtep: IPv4Address | None = None
    # What on this host would break guest networking, e.g. another firewall manager's
    # forward chain with policy drop (Docker's) in front of NAT.
    network_warnings: list[str] = Field(default=[], max_length=16)
    # The names of the host's `dir` (host-local) pools: a migration of a domain with a
    # volume in pool P needs a target that has a pool P. None: the host does not say (1.2).
    pools: list[str] | None = Field(default=None, max_length=256)


class HostHeartbeat(Message):
    """Published on `host.heartbeat.<host>`; a host silent for several intervals is down."""

    TYPE = "host.heartbeat"
    # 1.1: inventory.vtep, inventory.network_warnings; 1.2: enabled_generation, claims_seq;
    # 1.3: inventory.pools
    VERSION = "1.3"
    host: str
    version: str
    interval_s: float = Field(gt=0)
    enabled: bool = True
    # The generation of the last SetHostEnabled the host took (0: none). A reader keeps the
    # `enabled` it set with a newer generation over a beat sent before the host took it.
    enabled_generation: int = Field(default=0, ge=0)
    inventory: HostInventory
    usage: Resources
    # The host's count of claim changes `usage` was read at (0: not said, a 1.1 host): a
    # domain whose claim was taken at a count (DomainInfo.claim_seq) up to it is in `usage`.
    claims_seq: int = Field(default=0, ge=0)
    domains_by_state: dict[PowerState, int] = {}

    def routing_key(self) -> str:
        return event_key("host", "heartbeat", self.host)
