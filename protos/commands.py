"""Domain lifecycle commands sent to a compute node's queue (`compute.<host>`).

Each command names the reply it produces (`RESULT`); the bus returns that model from an RPC
call or raises `RemoteError` for an `error` reply. Together they form the closed command set a
compute node dispatches on.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from protos.base import Message
from protos.bindings import DiskBinding, ImageRef, PortBinding, StateRef
from protos.domain import MAX_DISKS, DomainSpec, PowerState
from protos.replies import (
    ConsoleOutput,
    ConsoleTicket,
    DomainInfo,
    DomainList,
    Done,
    SavedState,
)


class Command(Message):
    """A request to a service. `RESULT` is the model of its `ok` reply. `READ_ONLY`: it
    changes nothing, so a redelivered copy is simply run again and its reply is not
    recorded for idempotency (a page of a listing written to the store for nothing)."""

    RESULT: ClassVar[type[Message]] = Done
    READ_ONLY: ClassVar[bool] = False


class DomainCommand(Command):
    domain_id: uuid.UUID
    RESULT: ClassVar[type[Message]] = DomainInfo


class DefineDomain(Command):
    """Create or update a persistent domain definition without starting it.

    `privileged` says the requester is an admin (set by the API from the token, never from a
    request body): only then may the spec name host files outside the node's
    `allowed_boot_dirs`. The node keeps it with the definition for every later start."""

    TYPE = "cmd.domain.define"
    VERSION = "1.7"  # 1.1: `privileged`, bounded metadata and MAC; 1.2: bindings; 1.3: at most
    # 4 disks (the runtime's virtio-blk slots: more were never runnable, so minor)
    # 1.4: disks from images (`image`, `size_gib`, `keep`); 1.5: `boot.initrd_image`;
    # 1.6: `start`; 1.7: `and_start`
    RESULT = DomainInfo
    spec: DomainSpec
    privileged: bool = False
    # The create asked for a running guest (True) or a defined one (False); None: not said
    # (an older sender, a redefinition). The node keeps a requested start with the
    # definition until the domain first runs and reports it (DomainInfo.start_pending), so
    # whoever settles a create cut off between define and start can finish it.
    start: bool | None = None
    # With `start`: start the domain in this same command once it is defined (the answer is
    # the running domain, or the start's refusal with the definition kept); a node older
    # than 1.7 ignores it and answers the defined domain, to be started with StartDomain.
    # One round trip and one recorded answer fewer for a create (the scheduler's).
    and_start: bool = False
    # What the services resolved (protos.bindings): the spec's volume disks, root disk and
    # boot image, and its NICs' ports, in the spec's order. A redefinition that leaves
    # `ports` empty while the NICs are unchanged keeps the definition's current ones.
    disks: list[DiskBinding] = Field(default=[], max_length=MAX_DISKS)
    kernel_image: ImageRef | None = None
    initrd_image: ImageRef | None = None
    ports: list[PortBinding] = Field(default=[], max_length=8)


class UndefineDomain(DomainCommand):
    """Remove an inactive domain's definition."""

    TYPE = "cmd.domain.undefine"
    RESULT = Done


class StartDomain(DomainCommand):
    """Start the domain. `if_pending`: only if the create that defined it asked to start it
    (DefineDomain.start) and it has not run since; otherwise the answer is the domain as it
    is (what the API's orphan sweep sends to finish a create cut off before its start)."""

    TYPE = "cmd.domain.start"
    VERSION = "1.1"  # 1.1: `if_pending`
    paused: bool = False
    if_pending: bool = False


class ShutdownMode(StrEnum):
    ACPI = "acpi"  # ACPI power button / sleep request
    CTRL_ALT_DEL = "ctrl-alt-del"


class ShutdownDomain(DomainCommand):
    """Ask the guest to power off; after `timeout_s` without it the domain is destroyed if
    `force`, else left running and the reply says so."""

    TYPE = "cmd.domain.shutdown"
    mode: ShutdownMode = ShutdownMode.CTRL_ALT_DEL
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    force: bool = False
    wait: bool = True


class DestroyDomain(DomainCommand):
    """Stop the domain at once (pull the plug)."""

    TYPE = "cmd.domain.destroy"


class RebootMode(StrEnum):
    RESET = "reset"  # the host resets the machine (virsh reset)
    CTRL_ALT_DEL = "ctrl-alt-del"  # the guest decides (a Linux guest reboots)


class RebootDomain(DomainCommand):
    """Reboot: `reset` restarts the machine from the host at once; `ctrl-alt-del` asks the
    guest, whose own reset then arrives as a `domain.rebooted` event."""

    TYPE = "cmd.domain.reboot"
    VERSION = "1.1"
    mode: RebootMode = RebootMode.RESET


class PauseDomain(DomainCommand):
    TYPE = "cmd.domain.pause"


class ResumeDomain(DomainCommand):
    TYPE = "cmd.domain.resume"


class GetDomainInfo(DomainCommand):
    TYPE = "cmd.domain.get_info"


class ListDomains(Command):
    TYPE = "cmd.domain.list"
    RESULT = DomainList
    states: list[PowerState] | None = None


class GetConsole(DomainCommand):
    """The tail of the domain's console output (at most `max_bytes`)."""

    TYPE = "cmd.domain.console"
    RESULT = ConsoleOutput
    max_bytes: int = Field(default=65536, ge=1, le=4 * 1024 * 1024)


class OpenConsole(DomainCommand):
    """Ask the domain's compute node for a one-time ticket to its console relay: connect to
    `address:port` over TCP, send the ticket and a newline, then the connection is the guest's
    console (bytes in and out) until either side closes."""

    TYPE = "cmd.domain.open_console"
    RESULT = ConsoleTicket


class SaveDomain(DomainCommand):
    """Save a running or paused domain's whole machine (memory, vCPUs, devices) to `state`
    and end its VMM: the domain is `shutoff` (event STOPPED/SAVED). `managed`: libvirt's
    managedsave -- the node keeps `state` with the definition and the next StartDomain
    restores from it (STARTED/RESTORED) and then deletes it; else the state stays until a
    DeleteState. Nothing is left under the state's name if the save fails (disk full, VMM
    killed): the domain keeps running, or is reported as the VMM's death says."""

    TYPE = "cmd.domain.save"
    RESULT = SavedState
    state: StateRef
    managed: bool = False


class RestoreDomain(DomainCommand):
    """Start a shut-off domain from a saved state (a save's or a managed save's, taken on
    this host or, through a shared pool, on another host where the domain was defined):
    STARTED/RESTORED, or SUSPENDED/RESTORED with `paused`; seq continues. The state is kept
    (delete it with DeleteState, or ask with `consume`). Refused with a clear error, the
    domain left shut off, when the state is missing, corrupt, of a newer format or of
    another machine config."""

    TYPE = "cmd.domain.restore"
    VERSION = "1.1"  # 1.1: consume
    state: StateRef
    paused: bool = False
    # Delete the state once the machine runs from it (the API's restore of a save: one round
    # trip instead of a restore and a DeleteState).
    consume: bool = False


class RemoveManagedSave(DomainCommand):
    """Drop a shut-off domain's managed save (virsh managedsave-remove): the next start
    boots afresh."""

    TYPE = "cmd.domain.managedsave_remove"


class CreateSnapshot(DomainCommand):
    """A domain snapshot into `state`: for an active domain (with `memory`) the guest is
    paused, its machine saved, each disk copied (reflink where the pool can) and the guest
    resumed as it was; for a shut-off domain, or without `memory`, the disks only (an active
    domain is still paused while its disks are copied, so they agree)."""

    TYPE = "cmd.domain.snapshot_create"
    RESULT = SavedState
    state: StateRef
    memory: bool = True


class RevertSnapshot(DomainCommand):
    """Return a shut-off domain to snapshot `state`: its disks' contents replaced by the
    snapshot's copies, then, when the snapshot has memory, the machine restored running or
    paused as it was taken (STARTED/FROM_SNAPSHOT or SUSPENDED/FROM_SNAPSHOT); `start`
    overrides: False leaves it shut off, True starts a disk-only snapshot. The snapshot stays
    as it was (a revert never changes it)."""

    TYPE = "cmd.domain.snapshot_revert"
    state: StateRef
    start: bool | None = None


class DeleteState(DomainCommand):
    """Delete the files of a save or snapshot `state` of this domain. Snapshots are
    independent copies (reflink clones share blocks, not files), so deleting one never takes
    data another snapshot or the live domain needs. Deleting a state that is not there is a
    no-op."""

    TYPE = "cmd.domain.state_delete"
    RESULT = Done
    state: StateRef


DOMAIN_COMMANDS: tuple[type[Command], ...] = (
    DefineDomain,
    UndefineDomain,
    StartDomain,
    ShutdownDomain,
    DestroyDomain,
    RebootDomain,
    PauseDomain,
    ResumeDomain,
    GetDomainInfo,
    ListDomains,
    GetConsole,
    OpenConsole,
    SaveDomain,
    RestoreDomain,
    RemoveManagedSave,
    CreateSnapshot,
    RevertSnapshot,
    DeleteState,
)
