"""Replies to commands: `ok` results and the one error type every service answers with."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
from protos.bindings import StateRef
from protos.domain import Fault, PowerState, TaskState


class Done(Message):
    """An `ok` with nothing more to say."""

    TYPE = "reply.done"


class ErrorReply(Message):
    """The single error reply. `code` is stable and machine-readable (`not_found`,
    `conflict`, `invalid`, `no_capacity`, `unavailable`, `internal`); `details` carries what a
    caller needs to act (e.g. the current state for `conflict`)."""

    TYPE = "reply.error"
    code: str
    message: str
    details: dict[str, Any] = {}


class Interface(BaseModel):
    """A domain NIC as its host plugged it (virsh domiflist): port, network, MAC, address
    and the host's tap for it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    port_id: uuid.UUID
    network: str
    mac: str
    ipv4: IPv4Address | None = None
    tap: str = ""


class DomainInfo(Message):
    """A domain as its compute node sees it (virsh dominfo)."""

    TYPE = "reply.domain_info"
    VERSION = "1.3"  # 1.1: interfaces; 1.2: managed_save; 1.3: claim_seq
    domain_id: uuid.UUID
    name: str
    host: str
    state: PowerState
    task: TaskState = TaskState.NONE
    vcpus: int
    memory_mib: int
    seq: int = Field(ge=0)
    autostart: bool = False
    persistent: bool = True
    pid: int | None = None
    cpu_time_ns: int | None = None
    fault: Fault | None = None
    interfaces: list[Interface] = []
    # A managed save is kept for this shut-off domain: the next start restores it.
    managed_save: bool = False
    # The host's claim count at which this domain's resources were taken (None: it holds
    # none): every heartbeat with `claims_seq` at or past it counts them in its usage.
    claim_seq: int | None = Field(default=None, ge=0)


class SavedState(Message):
    """What a save, managed save or snapshot wrote (SaveDomain, CreateSnapshot).

    `memory`: guest memory and device state were saved (False: a shut-off domain's snapshot,
    disks only); `disks`: the targets whose contents were copied (reflink where the pool can);
    `power`: the domain's state when taken (a revert or restore returns to it); `bytes`: what
    the state occupies on its pool (allocated, not apparent: quotas count it); `pause_ms`: how
    long the guest was paused for it; `domain`: the domain after the operation."""

    TYPE = "reply.saved_state"
    domain_id: uuid.UUID
    state: StateRef
    memory: bool
    disks: list[str] = []
    power: PowerState
    bytes: int = Field(ge=0)
    taken_at: float  # seconds since the epoch
    pause_ms: float = Field(default=0.0, ge=0)
    domain: DomainInfo


class DomainList(Message):
    TYPE = "reply.domain_list"
    VERSION = "1.1"  # 1.1: DomainInfo 1.2 (managed_save)
    domains: list[DomainInfo]


class ConsoleOutput(Message):
    """Console bytes decoded as UTF-8 with replacement; the raw log stays on the host."""

    TYPE = "reply.console_output"
    domain_id: uuid.UUID
    data: str
    truncated: bool = False


class ConsoleTicket(Message):
    """Where and how to attach to a domain's console (see OpenConsole); valid once, for
    `expires_s` seconds."""

    TYPE = "reply.console_ticket"
    domain_id: uuid.UUID
    address: str
    port: int = Field(ge=1, le=65535)
    ticket: str = Field(min_length=16, max_length=128)
    expires_s: float = Field(gt=0)
