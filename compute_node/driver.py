"""The hypervisor driver contract: one abstract class, typed arguments, contracts in docstrings.

A driver runs guests and reports what happens to them; it decides nothing about events, seq or
policies' bookkeeping (the worker does). Drivers report every lifecycle change of a guest as a
`GuestEvent` to the sink the worker sets, each with a per-domain, strictly rising `n` that
survives restarts of the worker (the KVM driver takes it from the VMM's journal), so the worker
can resume after the last one it stored and never report a change twice.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from compute_node.boot_sources import BootFiles
from protos.commands import RebootMode, ShutdownMode
from protos.domain import DomainSpec, PowerState
from protos.host import KvmKind, Resources
from protos.migration import MigrationParams


class DriverError(Exception):
    """A driver operation failed. `code` maps to an ErrorReply code."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DomainNotRunning(DriverError):
    def __init__(self, domain_id: uuid.UUID) -> None:
        super().__init__(f"domain {domain_id} has no running machine", "conflict")


class GuestEventKind(StrEnum):
    STARTED = "started"  # detail: "booted" | "restarted" | "restored" | "from_snapshot"
    PAUSED = "paused"  # detail: "" | "restored" | "from_snapshot" (a restore left it paused)
    RESUMED = "resumed"
    REBOOTED = "rebooted"  # reset, restarted in place; reason: i8042_reset, reset_control, ...
    CRASHED = "crashed"  # the guest panicked; the policy's action follows as further events
    SHUTDOWN = "shutdown"  # the guest powered off; detail: "guest" | "host" (after a request)
    STOPPED = "stopped"  # reason: shutdown | destroyed | crashed | failed | saved; machine gone
    FAILED = "failed"  # the machine could not be started at all


@dataclass(frozen=True, slots=True)
class GuestEvent:
    domain_id: uuid.UUID
    n: int
    kind: GuestEventKind
    reason: str = ""
    detail: str = ""
    # The stamp of the durable (fsynced) journal record this event was read from, when it was:
    # (n, ts) then names the record for good, so the events it produces get stable message
    # ids and the store need not fsync them again (compute_node.store, "Durability").
    ts: float | None = None


EventSink = Callable[[GuestEvent], None]


@dataclass(frozen=True, slots=True)
class NicTap:
    """One guest NIC as the host plugged it (compute_node.networks): the tap to open, in
    network namespace `netns` (None: the driver's own), and the guest's MAC."""

    tap: str
    mac: str
    netns: str | None = None


@dataclass(frozen=True, slots=True)
class SavedMachine:
    """What `save` or `snapshot` wrote: `memory` (the machine state: memory, vCPUs, devices;
    False for a disk-only snapshot), the machine's `power` state when taken (running or
    paused: a restore returns to it), and how long the guest was paused for it."""

    memory: bool
    power: PowerState
    pause_ms: float


@dataclass(frozen=True, slots=True)
class IncomingMachine:
    """A machine waiting for a live migration (`prepare_incoming`): the source streams to
    `address:port` with the one-time `token` (64 hex digits), in the newest migration
    stream version the target's VMM speaks (native/migrate.h; 1: an older release's)."""

    address: str
    port: int
    token: str
    stream_version: int = 2


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """A running migration's figures (native.migration.MigrationProgress, by the names of
    protos.migration.MigrationJob). `phase`: a protos.migration.MigrationPhase value."""

    phase: str
    iteration: int = 0
    bytes_sent: int = 0
    remaining_bytes: int = 0
    memory_bytes: int = 0
    dirty_rate: int = 0
    bandwidth: int = 0
    predicted_ms: float = 0.0
    throttle_pct: int = 0
    elapsed_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """How `migrate_out` ended. `committed`: the target runs the guest and the source's
    machine is gone (its `stopped` event, reason `migrated`, has reached the sink). Not
    committed: the source runs on (or stays paused, if it was), `phase` is `failed` or
    `cancelled` and `error` says why. `downtime_ms`: the pause as the target measured it;
    `paused_ms`: as the source did (None if it never paused)."""

    committed: bool
    phase: str
    stats: MigrationStats
    downtime_ms: float | None = None
    paused_ms: float | None = None
    error: str | None = None


class RuntimeInfo(BaseModel):
    """What the driver knows of a domain's machine right now."""

    model_config = ConfigDict(frozen=True)
    state: PowerState
    pid: int | None = None
    cpu_time_ns: int | None = None


class Capabilities(BaseModel):
    model_config = ConfigDict(frozen=True)
    kvm: KvmKind
    max_vcpus: int
    console_attach: bool = False
    save_restore: bool = False
    live_migration: bool = False


class Driver(abc.ABC):
    """Runs guests on one host. Methods are thread-safe; those naming a domain raise
    DomainNotRunning when it has no machine, DriverError for anything else."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def host_resources(self) -> Resources:
        """Physical capacity of the host (before overcommit and reservations)."""

    @abc.abstractmethod
    def set_event_sink(self, sink: EventSink) -> None:
        """Where GuestEvents go. Called once, before anything else; the sink may block briefly
        (it persists the event) and is called from driver threads, one event at a time per
        domain, in `n` order."""

    @abc.abstractmethod
    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        """Start a machine for `spec`; return once it runs (or is paused, if asked). Its
        `started` event has reached the sink by then. `files` are the spec's kernel and
        initrd, opened and checked by the worker (boot_sources.py): a driver reads those
        descriptors, never the paths again, and does not close them. `nics` are the spec's
        NICs in order, their taps plugged already (the machine gets a virtio-net per tap,
        with its MAC). A process the domain
        kept without a machine (`process_stays`) is ended first. Raises DriverError (code
        `spawn_failed`, or `invalid` for files that are no bootable image) with the reason if
        it could not start; no events then."""

    @abc.abstractmethod
    def adopt(self, domain_id: uuid.UUID, after_n: int) -> RuntimeInfo | None:
        """Find a machine left running by an earlier worker and watch it again, first
        reporting every event after `after_n` that happened meanwhile (a machine that died
        unreported is reported as `stopped`/`failed`). None if there is no trace of one."""

    @abc.abstractmethod
    def destroy(self, domain_id: uuid.UUID) -> None:
        """Stop the machine at once; its `stopped` (destroyed) event reaches the sink first.
        A process kept without a machine (`process_stays`) is ended, with no event."""

    @abc.abstractmethod
    def shutdown(self, domain_id: uuid.UUID, mode: ShutdownMode) -> None:
        """Ask the guest to power off and return at once (DriverError `unsupported` for a mode
        the machine lacks). The guest's poweroff arrives later as events."""

    @abc.abstractmethod
    def reboot(self, domain_id: uuid.UUID, mode: RebootMode) -> None:
        """`reset`: restart the machine now (a `rebooted` event before returning);
        `ctrl-alt-del`: ask the guest and return."""

    @abc.abstractmethod
    def pause(self, domain_id: uuid.UUID) -> None:
        """Stop every vCPU; `paused` event before returning."""

    @abc.abstractmethod
    def resume(self, domain_id: uuid.UUID) -> None:
        """Run again; `resumed` event before returning."""

    @abc.abstractmethod
    def get_info(self, domain_id: uuid.UUID) -> RuntimeInfo:
        """State of the machine; `shutoff` when there is none."""

    @abc.abstractmethod
    def console(self, domain_id: uuid.UUID, max_bytes: int) -> tuple[bytes, bool]:
        """The tail of the console output and whether older output was dropped."""

    @abc.abstractmethod
    def remove(self, domain_id: uuid.UUID) -> None:
        """Forget what is kept for a domain that has no machine (its directory, logs), ending
        first a process kept by a preserve policy (DriverError `conflict` if that process
        still has a machine)."""

    # -- save, restore and snapshots (docs/snapshots.md) -------------------------------------
    # Optional: a driver without them keeps these defaults (`Capabilities.save_restore` False).
    # `directory` is an existing, empty directory the worker chose for the state (it derived
    # it from a StateRef); the files in it are the driver's. Guest disks are the worker's:
    # it copies them for a snapshot (inside `during`) and reverts them before a restore.

    def save(self, domain_id: uuid.UUID, directory: Path) -> SavedMachine:
        """Pause the machine, write its whole state into `directory` and end it: its
        `stopped` event, reason `saved`, reaches the sink before this returns. Files are
        written under temporary names, fsync'd and renamed, so a save cut short (disk full,
        the VMM killed) leaves nothing that passes as a valid state. On failure the machine
        goes on as it was (running or paused; or, if its process died, as that death is
        reported) and DriverError says why (`no_space` for a full disk)."""
        del domain_id, directory
        raise DriverError("this driver cannot save machines", "unsupported")

    def snapshot(
        self, domain_id: uuid.UUID, directory: Path | None, during: Callable[[], None]
    ) -> SavedMachine:
        """Pause the machine (no `paused` event: the pause is the snapshot's), write its state
        into `directory` (None: disks only), call `during` while it is paused (the worker
        copies the disks there, so they agree with the memory), then let it go on as it was.
        On any failure, of the save or of `during`, the machine goes on as it was, nothing
        valid is left in `directory`, and the error propagates."""
        del domain_id, directory, during
        raise DriverError("this driver cannot snapshot machines", "unsupported")

    def restore(
        self,
        spec: DomainSpec,
        files: BootFiles,
        directory: Path,
        *,
        paused: bool | None = None,
        nics: Sequence[NicTap] = (),
        detail: str = "restored",
    ) -> RuntimeInfo:
        """Like `spawn`, but the machine continues from the state in `directory` (written by
        `save` or `snapshot` for this spec's machine config) instead of booting: its `started`
        event with `detail` ("restored" or "from_snapshot") reaches the sink before this
        returns, then a `paused` one with the same detail if it stays paused (`paused` None:
        as it was taken). `files` and `nics` are opened and plugged afresh, as for `spawn`
        (taps are not part of a saved state; the guest's MACs are). Raises DriverError
        (`invalid`) with the reason and no events when the state is missing, corrupt, of a
        newer format or of another machine config."""
        del spec, files, directory, paused, nics, detail
        raise DriverError("this driver cannot restore machines", "unsupported")

    # -- live migration (docs/migration.md, "The control plane") ------------------------------
    # Optional: a driver without it keeps these defaults (`Capabilities.live_migration` False).

    def prepare_incoming(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        nics: Sequence[NicTap] = (),
        listen: str = "127.0.0.1",
        paused: bool = False,
        copy_disks: Sequence[int] = (),
    ) -> IncomingMachine:
        """Start a process for `spec` that waits on `listen` (any free port) for a migration
        stream with a fresh one-time token, `files` and `nics` opened and plugged as for
        `spawn`. No events while it waits. Once the source commits, the machine runs: its
        `started` event, reason `migrated`, reaches the sink (then `paused`, reason
        `migrated`, when `paused`: the guest was paused at the source and stays so). A stream
        that fails before the commit ends the process with no event; so does
        `cancel_incoming`. Raises DriverError (`spawn_failed`) if it could not start.
        `copy_disks`: the indices (in target order) of the disks the source copies into
        `files`' own (a block copy of host-local volumes; each file the source's size)."""
        del spec, files, nics, listen, paused, copy_disks
        raise DriverError("this driver cannot migrate machines", "unsupported")

    def cancel_incoming(self, domain_id: uuid.UUID) -> None:
        """End a machine `prepare_incoming` started that has not run the guest (no event);
        a no-op when there is none. A machine that already runs the guest is left alone
        (DriverError `conflict`)."""
        del domain_id

    def migrate_out(
        self,
        domain_id: uuid.UUID,
        target: IncomingMachine,
        params: MigrationParams,
        progress: Callable[[MigrationStats], None],
        copy_disks: Sequence[int] = (),
    ) -> MigrationOutcome:
        """Migrate the running or paused machine to `target` and return how it ended
        (blocking; `progress` is called at most every MIGRATION_PROGRESS_S from another
        thread). Events of the source's machine: `paused`, reason `migrating`, when it
        pauses for the last pages (not if it was paused already), then `stopped`, reason
        `migrated`, on the commit, or `resumed`, reason `migration_failed`, when a failure
        after that pause resumes it. Anything failing before the commit leaves the source's
        machine as it was; a failure after the commit (the target never confirmed) leaves it
        paused and raises DriverError (`migration_unconfirmed`): only the target knows.
        `copy_disks`: the disk slots (target order) the stream copies into the target's own
        files (host-local volumes; the target's `prepare_incoming` names the same ones)."""
        del domain_id, target, params, progress, copy_disks
        raise DriverError("this driver cannot migrate machines", "unsupported")

    def migration_set(
        self,
        domain_id: uuid.UUID,
        *,
        max_downtime_ms: float | None = None,
        bandwidth_mibps: int | None = None,
    ) -> None:
        """Change the budget or the cap of the domain's running `migrate_out`
        (DriverError `conflict` when none runs)."""
        del domain_id, max_downtime_ms, bandwidth_mibps
        raise DriverError("no migration of this domain runs", "conflict")

    def migration_cancel(self, domain_id: uuid.UUID) -> None:
        """Ask the domain's running `migrate_out` to stop before its commit (it then returns
        phase `cancelled`); a no-op when none runs or it is past its commit."""
        del domain_id

    def process_stays(self, event: GuestEvent) -> bool:  # noqa: ARG002 (a default)
        """Whether the machine's process lives on after `event`: a `stopped` under a preserve
        policy leaves it (inspectable, holding host resources) until `spawn`, `destroy` or
        `remove` ends it. Drivers without such processes keep this default."""
        return False

    def close(self) -> None:  # noqa: B027  (an optional hook: most drivers hold nothing)
        """Stop watching machines (they keep running)."""
