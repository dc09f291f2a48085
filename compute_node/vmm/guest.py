"""The guest's machine and its lifecycle in `PowerState` terms: boot or restore, the domain's
on_poweroff/on_reboot/on_crash policies, save, and the journal record of every change
(docs/vmm.md, "Policies"). Standard library, msgpack and `native` only."""

from __future__ import annotations

import errno
import selectors
import time
from collections.abc import Callable
from enum import StrEnum

from compute_node.vmm.config import LaunchConfig
from compute_node.vmm.console import ConsoleBuffer
from compute_node.vmm.frames import Journal, JournalRecord
from compute_node.vmm.protocol import ControlError
from native.machine import (
    Disk,
    Event,
    EventKind,
    Machine,
    MachineState,
    MachineStateError,
    Nic,
    SnapshotError,
    SnapshotStats,
    VmmError,
    snapshot_info,
)

EXIT_OK = 0
EXIT_FAILED = 1
# A guest that powered off or crashed is announced first and its machine ended this long
# after: unmapping its RAM and closing KVM (TLB shootdowns on every core it ran on) would
# otherwise share the host's CPUs with the event on its way to the worker, the broker and
# its subscribers (bench/events.py on a quiet 2-core host: 1.9 -> 1.45 ms). The loop waits
# meanwhile, so nothing else is handled between the announcement and the end.
END_AFTER_ANNOUNCING_S = 0.002


class Power(StrEnum):
    """The VMM's view of the domain: the values are `protos.domain.PowerState`'s (a unit test
    holds them equal; the VMM does not import pydantic)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"


class Fatal(Exception):
    """The VMM cannot go on (e.g. a policy restart failed): journal `stopped`/failed, exit 1."""


def control_error(exc: VmmError) -> ControlError:
    """A runtime error as the control protocol reports it."""
    if exc.errno == errno.ENOSPC:
        return ControlError("no_space", exc.message)
    if exc.errno == errno.ENOTSUP:
        return ControlError("unsupported", exc.message)
    if isinstance(exc, MachineStateError):
        return ControlError("state", exc.message)
    return ControlError("vmm", exc.message)


class Guest:
    """One domain's machine (at most one at a time) and its power state. Every change is
    journaled (fsync'ed) and then handed to `notify` (the loop's subscribers)."""

    def __init__(
        self,
        config: LaunchConfig,
        journal: Journal,
        console: ConsoleBuffer,
        sel: selectors.BaseSelector,
        notify: Callable[[JournalRecord], None],
    ) -> None:
        self.config = config
        self.journal = journal
        self.console = console
        self.sel = sel
        self.notify = notify
        self.machine: Machine | None = None
        self.machine_started = False
        self.power = Power.SHUTOFF
        self.started_at = 0.0
        self.shutdown_requested = False
        self.reboot_requested = False
        self.exit_code: int | None = None
        # Called before a machine event is handled: an outgoing migration holds the machine
        # (its control lock) and must end first (compute_node.vmm.operations).
        self.before_event: Callable[[], None] = lambda: None

    # -- start ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Makes and starts the first machine (or restores it); VmmError propagates, with
        nothing journaled and no machine left."""
        restore = self.config.restore
        if restore is not None:
            self._restore_machine(restore.directory)
            detail, paused = restore.detail, restore.paused
        else:
            self._new_machine()
            detail, paused = "booted", self.config.start_paused
        if paused:
            self.power = Power.PAUSED
            self.record("started", "", detail)
            self.record("paused", "start_paused", "" if restore is None else detail)
        else:
            self._start_machine()
            self.record("started", "", detail)

    def _restore_machine(self, directory: str) -> None:
        cfg = self.config
        info = snapshot_info(directory)  # SnapshotError for a missing or damaged state
        if (info.vcpus, info.memory_mib) != (cfg.vcpus, cfg.memory_mib):
            raise SnapshotError(
                f"the state in {directory} is of a machine with {info.vcpus} vCPU(s) and "
                f"{info.memory_mib} MiB, not {cfg.vcpus} and {cfg.memory_mib} MiB",
                errno.EINVAL,
            )
        machine = Machine.restore(
            directory,
            console_out=self.console.out_w,
            console_in=self.console.in_r,
            disks=[Disk(d.path, read_only=d.read_only, id=d.id) for d in cfg.disks],
            nics=[Nic(fd, mac) for fd, mac in cfg.nics],
        )
        self._adopt_machine(machine)

    def _new_machine(self) -> None:
        cfg = self.config
        machine = Machine(
            cfg.kernel,
            initrd=cfg.initrd,
            cmdline=cfg.cmdline,
            memory_mib=cfg.memory_mib,
            vcpus=cfg.vcpus,
            console_out=self.console.out_w,
            console_in=self.console.in_r,
            disks=[Disk(d.path, read_only=d.read_only, id=d.id) for d in cfg.disks],
            nics=[Nic(fd, mac) for fd, mac in cfg.nics],
        )
        self._adopt_machine(machine)

    def _adopt_machine(self, machine: Machine) -> None:
        self.machine = machine
        self.machine_started = False
        self.shutdown_requested = False
        self.reboot_requested = False
        self.sel.register(machine.event_fd, selectors.EVENT_READ, self._on_machine_event)

    def _start_machine(self) -> None:
        assert self.machine is not None
        self.machine.start()
        self.machine_started = True
        self.started_at = time.time()
        self.power = Power.RUNNING

    def end_machine(self) -> None:
        machine, self.machine = self.machine, None
        self.machine_started = False
        if machine is None:
            return
        try:
            self.sel.unregister(machine.event_fd)
        except (KeyError, ValueError, VmmError):
            pass
        machine.close()

    def restart(self) -> None:
        """A fresh machine from the same config, running; Fatal if it cannot be made."""
        self.end_machine()
        try:
            self._new_machine()
            self._start_machine()
        except VmmError as exc:
            self.end_machine()
            raise Fatal(f"restart failed: {exc.message}") from exc

    # -- journal ----------------------------------------------------------------------------

    def record(self, kind: str, reason: str = "", detail: str = "") -> None:
        """Journals (fsync'ed) first, then tells subscribers at once."""
        self.notify(self.journal.append(kind, reason, detail))

    def die(self, detail: str) -> None:
        try:
            self.end_machine()
        except Exception:
            pass  # the process exit releases the rest
        try:
            self.record("stopped", "failed", detail)
        except Exception:
            pass
        self.exit_code = EXIT_FAILED

    # -- machine events and policies --------------------------------------------------------

    def migrated_in(self, machine: Machine, paused: bool) -> None:
        """The machine an incoming migration made runs (`started`, reason `migrated`), or,
        for a guest paused at the source, is loaded and stays paused, never started here
        until a resume (`started`, then `paused`, reason `migrated`)."""
        self._adopt_machine(machine)
        if paused:
            self.power = Power.PAUSED
            self.record("started", "migrated")
            self.record("paused", "migrated")
            return
        self.machine_started = True
        self.started_at = time.time()
        self.power = Power.RUNNING
        self.record("started", "migrated")

    def migrated_out(self) -> None:
        """The target runs the guest (committed and confirmed): the machine goes,
        `stopped`/migrated first, then the VMM exits 0."""
        self.record("stopped", "migrated")
        self.end_machine()
        self.power = Power.SHUTOFF
        self.exit_code = EXIT_OK

    def _on_machine_event(self, _mask: int) -> None:
        self.before_event()
        machine = self.machine
        while machine is not None and machine is self.machine:
            event = machine.read_event()
            if event is None:
                return
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        if event.kind is EventKind.POWEROFF:
            if self.reboot_requested:
                # A reboot asked of a guest that powers off instead (libvirt's fake reboot).
                self._on_reset("host", f"guest powered off ({event.reason})")
                return
            self.record("shutdown", event.reason, "host" if self.shutdown_requested else "guest")
            self._apply(self.config.on_poweroff, "poweroff", "shutdown", "poweroff", announced=True)
        elif event.kind is EventKind.REBOOT:
            self._on_reset(event.reason, "host" if self.reboot_requested else "guest")
        elif event.kind is EventKind.CRASHED:
            self.record("crashed", event.reason, f"vcpu {event.vcpu}")
            if self.config.on_crash == "preserve":
                if self.machine is not None and self.machine_started:
                    try:
                        self.machine.pause()
                    except MachineStateError:
                        pass  # it ended meanwhile; that event follows and is handled
                self.power = Power.CRASHED
            else:
                self._apply(self.config.on_crash, "crash", "crashed", event.reason, announced=True)
        else:
            self.end_machine()
            words = ", ".join(str(d) for d in event.detail)
            self.record(
                "stopped",
                "failed",
                f"{event.reason} (KVM exit {event.code}, vcpu {event.vcpu}, detail {words})",
            )
            self.exit_code = EXIT_FAILED

    def _on_reset(self, reason: str, detail: str) -> None:
        if self.config.on_reboot == "restart":
            self.restart()
            self.record("rebooted", reason, detail)
        else:
            self._apply(self.config.on_reboot, "reboot", "shutdown", "reboot")

    def _apply(
        self,
        policy: str,
        cause: str,
        stop_reason: str,
        stop_detail: str,
        *,
        announced: bool = False,
    ) -> None:
        if policy == "restart":
            self.restart()
            self.record("started", cause, "restarted")
            return
        if announced:
            time.sleep(END_AFTER_ANNOUNCING_S)
        self.end_machine()
        self.power = Power.SHUTOFF
        self.record("stopped", stop_reason, stop_detail)
        if policy == "destroy":
            self.exit_code = EXIT_OK

    # -- host actions -----------------------------------------------------------------------

    def need_machine(self) -> Machine:
        if self.machine is None:
            raise ControlError("state", f"the domain is {self.power}")
        return self.machine

    def destroy(self, detail: str) -> None:
        had_machine = self.machine is not None
        self.end_machine()
        if had_machine:
            self.record("stopped", "destroyed", detail)
        self.power = Power.SHUTOFF
        self.exit_code = EXIT_OK

    def pause(self) -> None:
        """Stops the vCPUs (no record: the caller journals what the pause is for)."""
        machine = self.need_machine()
        if self.machine_started:
            machine.pause()
        self.power = Power.PAUSED

    def resume(self) -> None:
        """Runs the vCPUs (starting them the first time after a paused start)."""
        machine = self.need_machine()
        if self.machine_started:
            machine.resume()
            self.power = Power.RUNNING
        else:
            self._start_machine()

    def hold_for_save(self) -> Power:
        """Pauses a running or paused machine for a save; returns the state to go back to."""
        was = self.power
        if was not in (Power.RUNNING, Power.PAUSED):
            raise ControlError("state", f"cannot save a {was} domain")
        if was is Power.RUNNING:
            self.pause()
        return was

    def write_state(self, directory: str, was: Power, *, live: bool = False) -> SnapshotStats:
        """Machine.save of the paused machine into `directory`, or (`live`) of the running
        one while it runs: paused only for the last pass and the state, and left paused for
        the caller. On failure the machine goes back to `was` and ControlError says why
        (`no_space` for a full disk)."""
        machine = self.need_machine()
        try:
            if not live:
                return machine.save(directory)
            stats = machine.save(directory, live=True, keep_paused=True)
            self.power = Power.PAUSED
            return stats
        except VmmError as exc:
            self._failed_save(machine, was, live)
            raise control_error(exc) from None
        except OSError as exc:  # creating the directory, clearing old temporaries
            self._failed_save(machine, was, live)
            code = "no_space" if exc.errno == errno.ENOSPC else "vmm"
            raise ControlError(code, f"{directory}: {exc.strerror or exc}") from None

    def _failed_save(self, machine: Machine, was: Power, live: bool) -> None:
        # A live save that failed has let its machine run again, unless resuming failed too.
        if live and machine.state() is MachineState.PAUSED:
            self.power = Power.PAUSED
        self.release(was)

    def release(self, was: Power) -> None:
        """Back to `was` after a save's pause (nothing is journaled: nothing changed)."""
        if was is Power.RUNNING and self.machine is not None and self.power is Power.PAUSED:
            self.resume()

    def saved(self, was: Power) -> None:
        """The state is written: end the machine, `stopped`/saved first (a worker that was
        down learns it from the journal), then exit 0."""
        self.record("stopped", "saved", str(was))
        self.end_machine()
        self.power = Power.SHUTOFF
        self.exit_code = EXIT_OK
