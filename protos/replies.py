"""Replies to commands: `ok` results and the one error type every service answers with."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
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
    VERSION = "1.1"  # 1.1: interfaces
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


class DomainList(Message):
    TYPE = "reply.domain_list"
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
