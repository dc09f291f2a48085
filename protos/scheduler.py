"""Placement: the scheduler's command and reply, and host administration commands.

The API sends `ScheduleDomain` (RPC) to the `scheduler` queue. The scheduler filters and weighs
hosts, then asks the chosen compute node to define (and start) the domain; a compute node that
refuses (`no_capacity`, `spawn_failed`, …) is recorded as an attempt and the next host is tried,
up to `max_attempts`; a refusal of the spec itself (`invalid`, `forbidden`) is the same on every
host and is the answer at once (with `field` in its details). The reply is a `Placement`, or
an `ErrorReply` with code `no_valid_host` whose details carry `attempts` (host, code, message)
and `filtered` (filter name → hosts it removed) so the caller can say why.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
from protos.bindings import DiskBinding, ImageRef
from protos.commands import Command
from protos.domain import MAX_DISKS, NAME_PATTERN, DomainSpec
from protos.replies import DomainInfo, Done
from protos.routing import event_key


class Attempt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    host: str
    code: str
    message: str


class Placement(Message):
    """Where a domain went, what the compute node answered, and the hosts that refused first."""

    TYPE = "reply.placement"
    VERSION = "1.1"  # 1.1: DomainInfo 1.2 (managed_save)
    host: str
    info: DomainInfo
    attempts: list[Attempt] = []


class ScheduleDomain(Command):
    """Place `spec` on a host, define it there and start it unless `start` is false.
    `privileged` (the requester is an admin) travels on to the compute node's DefineDomain."""

    TYPE = "cmd.scheduler.schedule"
    VERSION = "1.5"  # 1.1: `privileged`, bounded metadata and MAC; 1.2: bindings; 1.3: at most
    # 4 disks (the runtime's virtio-blk slots: more were never runnable, so minor)
    # 1.4: disks from images (`image`, `size_gib`, `keep`); 1.5: `boot.initrd_image`
    RESULT = Placement
    spec: DomainSpec
    project: str = Field(pattern=NAME_PATTERN)
    privileged: bool = False
    # Resolved by the API through the storage service (protos.bindings); passed on to the
    # chosen host's DefineDomain. A disk on a host-local pool restricts placement to its host.
    # Ports are not here: the scheduler allocates them from the network service.
    disks: list[DiskBinding] = Field(default=[], max_length=MAX_DISKS)
    kernel_image: ImageRef | None = None
    initrd_image: ImageRef | None = None
    start: bool = True
    max_attempts: int = Field(default=3, ge=1, le=20)


class SetHostEnabled(Command):
    """Sent to `compute.<host>`: a disabled host keeps its guests but gets no new ones (its
    heartbeat says `enabled: false`, and the scheduler's filter skips it). The host keeps it
    across restarts. `generation` (1.1) orders the switches: the host ignores one older than
    the last it took and puts the one it took in its heartbeats (`enabled_generation`); 0
    (a 1.0 sender) takes the next after the host's own."""

    TYPE = "cmd.host.set_enabled"
    VERSION = "1.1"
    RESULT = Done
    enabled: bool
    reason: str = Field(default="", max_length=255)
    generation: int = Field(default=0, ge=0)


class ClaimPhase(StrEnum):
    CLAIMED = "claimed"  # a replica chose the host and is about to ask it
    PLACED = "placed"  # the host took the domain: its heartbeats will count it from now on
    RELEASED = "released"  # the host refused or did not answer: the resources are free again


class PlacementClaim(Message):
    """A scheduler replica's claim, published on `placement.<phase>.<domain_id>` so the other
    replicas count claims in flight and learn group membership (domain events carry the host,
    not the group). A group is `group` within `project` (1.1; a 1.0 claim names no project).
    The compute node stays the final arbiter; this only narrows the window in which two
    replicas can pick the same room. `claim_seq` (1.2, `placed` only): the host's claim count
    at which it took the domain (DomainInfo.claim_seq), so peers drop the claim exactly when
    the host's heartbeat counts it."""

    TYPE = "placement.claim"
    VERSION = "1.2"
    phase: ClaimPhase
    replica: str
    domain_id: uuid.UUID
    host: str
    vcpus: int = Field(ge=0)
    memory_mib: int = Field(ge=0)
    group: str | None = None
    project: str | None = None
    claim_seq: int | None = Field(default=None, ge=0)

    def routing_key(self) -> str:
        return event_key("placement", self.phase.value, str(self.domain_id))


class PlacementSync(Message):
    """A marker a scheduler replica sends to its own subscription queue (through the default
    exchange, never the events exchange) and waits to read back: every event the broker had
    queued for the replica before it, such as a peer's confirmed `claimed`, has then been
    applied to the replica's state. A redelivered `ScheduleDomain` waits for it before looking
    for an earlier claim on its domain."""

    TYPE = "placement.sync"
    replica: str
    token: str = Field(max_length=64)
