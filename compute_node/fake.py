"""An in-memory driver for hosts without KVM, unit tests and scale simulations.

Machines are records; "guest" actions (`guest_poweroff`, `guest_reboot`, `guest_panic`,
`machine_dies`) let tests play the guest's part. Policies (on_poweroff/on_reboot/on_crash) are
applied here as the KVM driver's VMM process applies them. Never a stand-in for KVM tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compute_node.boot_sources import BootFiles
from compute_node.driver import (
    Capabilities,
    DomainNotRunning,
    Driver,
    DriverError,
    EventSink,
    GuestEvent,
    GuestEventKind,
    IncomingMachine,
    MigrationOutcome,
    MigrationStats,
    NicTap,
    RuntimeInfo,
    SavedMachine,
)
from compute_node.fake_migration import Incoming, Outgoing, Stream, StreamError, outcome
from compute_node.fake_migration import listen as listen_for
from protos.commands import RebootMode, ShutdownMode
from protos.domain import DomainSpec, LifecycleAction, PowerState
from protos.host import KvmKind, Resources
from protos.migration import MigrationParams

K = GuestEventKind
STATE_FILE = "fake-machine.json"
STATE_FORMAT = 1


@dataclass
class _Machine:
    spec: DomainSpec
    state: PowerState
    pid: int
    # What the guest has counted (boots, resets): carried by a migration, as memory would be.
    counters: dict[str, int] = field(default_factory=dict)


class FakeDriver(Driver):
    def __init__(self, vcpus: int = 16, memory_mib: int = 65536) -> None:
        self._resources = Resources(vcpus=vcpus, memory_mib=memory_mib)
        self._machines: dict[uuid.UUID, _Machine] = {}
        self._n: dict[uuid.UUID, int] = {}
        self._console: dict[uuid.UUID, bytearray] = {}
        self._sink: EventSink | None = None
        self._lock = threading.RLock()
        self._next_pid = 10_000
        self.fail_next_spawn: str | None = None
        # The next save or snapshot fails with this DriverError code (`no_space`: disk full).
        self.fail_next_save: str | None = None
        # The NICs each domain's last spawn was given (what a VMM would have opened).
        self.nics: dict[uuid.UUID, list[NicTap]] = {}
        # Migrations: machines waiting for their stream here, and streams going out.
        self._incoming: dict[uuid.UUID, Incoming] = {}
        self._outgoing: dict[uuid.UUID, Outgoing] = {}
        # The next incoming migration runs the machine, then drops the connection unconfirmed.
        self.drop_next_confirm = False

    def capabilities(self) -> Capabilities:
        return Capabilities(kvm=KvmKind.NONE, max_vcpus=64, save_restore=True, live_migration=True)

    def host_resources(self) -> Resources:
        return self._resources

    def set_event_sink(self, sink: EventSink) -> None:
        self._sink = sink

    def _emit(
        self, domain_id: uuid.UUID, kind: GuestEventKind, reason: str = "", detail: str = ""
    ) -> None:
        self._n[domain_id] = n = self._n.get(domain_id, 0) + 1
        assert self._sink is not None, "set_event_sink first"
        self._sink(GuestEvent(domain_id, n, kind, reason, detail))

    def _machine(self, domain_id: uuid.UUID) -> _Machine:
        machine = self._machines.get(domain_id)
        if machine is None or machine.state is PowerState.SHUTOFF:
            raise DomainNotRunning(domain_id)
        return machine

    def spawn(
        self,
        spec: DomainSpec,
        _files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        with self._lock:
            self.nics[spec.uuid] = list(nics)
            if self.fail_next_spawn:
                reason, self.fail_next_spawn = self.fail_next_spawn, None
                self._emit(spec.uuid, K.FAILED, reason)
                raise DriverError(reason, "spawn_failed")
            self._next_pid += 1
            machine = _Machine(spec, PowerState.RUNNING, self._next_pid, {"boots": 1})
            self._machines[spec.uuid] = machine
            self._console[spec.uuid] = bytearray(b"flotilla-guest: READY\n")
            self._emit(spec.uuid, K.STARTED, detail="booted")
            if paused:
                machine.state = PowerState.PAUSED
                self._emit(spec.uuid, K.PAUSED)
            return self._info(machine)

    def adopt(self, domain_id: uuid.UUID, after_n: int) -> RuntimeInfo | None:
        del after_n  # events are delivered synchronously: none can have been missed
        with self._lock:
            machine = self._machines.get(domain_id)
            return None if machine is None else self._info(machine)

    def destroy(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            machine = self._machine(domain_id)
            machine.state = PowerState.SHUTOFF
            self._emit(domain_id, K.STOPPED, "destroyed")

    def shutdown(self, domain_id: uuid.UUID, mode: ShutdownMode) -> None:
        del mode  # the fake guest obeys any request at once
        with self._lock:
            self._machine(domain_id)
            # The fake guest obeys at once.
            self._poweroff(domain_id, "host")

    def reboot(self, domain_id: uuid.UUID, mode: RebootMode) -> None:
        del mode  # the fake guest obeys any request at once
        with self._lock:
            self._machine(domain_id)
            self.guest_reboot(domain_id, "host")

    def pause(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            self._machine(domain_id).state = PowerState.PAUSED
            self._emit(domain_id, K.PAUSED)

    def resume(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            self._machine(domain_id).state = PowerState.RUNNING
            self._emit(domain_id, K.RESUMED)

    def get_info(self, domain_id: uuid.UUID) -> RuntimeInfo:
        with self._lock:
            machine = self._machines.get(domain_id)
            if machine is None:
                return RuntimeInfo(state=PowerState.SHUTOFF)
            return self._info(machine)

    def console(self, domain_id: uuid.UUID, max_bytes: int) -> tuple[bytes, bool]:
        data = bytes(self._console.get(domain_id, b""))
        return data[-max_bytes:], len(data) > max_bytes

    def remove(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            self._machines.pop(domain_id, None)
            self._console.pop(domain_id, None)

    # ---- save, snapshot, restore: the fake machine's state is a checksummed JSON file ------

    def save(self, domain_id: uuid.UUID, directory: Path) -> SavedMachine:
        with self._lock:
            machine = self._machine(domain_id)
            power = machine.state
            self._write_state(machine, directory)
            machine.state = PowerState.SHUTOFF
            self._emit(domain_id, K.STOPPED, "saved")
            return SavedMachine(memory=True, power=power, pause_ms=0.0)

    def snapshot(
        self, domain_id: uuid.UUID, directory: Path | None, during: Callable[[], None]
    ) -> SavedMachine:
        with self._lock:
            machine = self._machine(domain_id)
            if directory is not None:
                self._write_state(machine, directory)
            try:
                during()
            except BaseException:
                if directory is not None:
                    (directory / STATE_FILE).unlink(missing_ok=True)
                raise
            return SavedMachine(memory=directory is not None, power=machine.state, pause_ms=0.0)

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
        del files
        with self._lock:
            saved = _read_state(directory, spec)
            self.nics[spec.uuid] = list(nics)
            self._next_pid += 1
            machine = _Machine(spec, PowerState.RUNNING, self._next_pid)
            self._machines[spec.uuid] = machine
            self._console[spec.uuid] = bytearray(saved["console"].encode())
            self._emit(spec.uuid, K.STARTED, detail=detail)
            if paused or (paused is None and saved["state"] == PowerState.PAUSED.value):
                machine.state = PowerState.PAUSED
                self._emit(spec.uuid, K.PAUSED, detail=detail)
            return self._info(machine)

    def _write_state(self, machine: _Machine, directory: Path) -> None:
        """Write the machine's state (under a temporary name, fsync'd, renamed), or fail
        as asked by `fail_next_save` leaving nothing."""
        if self.fail_next_save:
            code, self.fail_next_save = self.fail_next_save, None
            raise DriverError(f"fake save failed ({code})", code)
        spec = machine.spec
        body = {
            "format": STATE_FORMAT,
            "domain_id": str(spec.uuid),
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "state": machine.state.value,
            "console": bytes(self._console.get(spec.uuid, b"")).decode("utf-8", "replace"),
        }
        text = json.dumps(body, sort_keys=True)
        data = json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": text})
        tmp = directory / (STATE_FILE + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(directory / STATE_FILE)

    @staticmethod
    def _info(machine: _Machine) -> RuntimeInfo:
        pid = None if machine.state is PowerState.SHUTOFF else machine.pid
        return RuntimeInfo(state=machine.state, pid=pid, cpu_time_ns=0)

    # ---- live migration over loopback TCP (compute_node.fake_migration) -----------------

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
        del (
            files,
            paused,
            copy_disks,
        )  # no disks: nothing to copy  # the stream's state says whether the guest was paused
        domain_id = spec.uuid
        with self._lock:
            machine = self._machines.get(domain_id)
            if domain_id in self._incoming or (
                machine is not None and machine.state is not PowerState.SHUTOFF
            ):
                raise DriverError(f"domain {domain_id} has a machine here", "spawn_failed")

            def arrive(state: dict[str, Any]) -> None:
                self._arrive(spec, list(nics), state)

            def ended(incoming: Incoming) -> None:
                with self._lock:
                    if self._incoming.get(domain_id) is incoming:
                        del self._incoming[domain_id]

            incoming = self._incoming[domain_id] = listen_for(domain_id, listen, arrive, ended)
            incoming.drop_before_done, self.drop_next_confirm = self.drop_next_confirm, False
            return incoming.endpoint()

    def _arrive(self, spec: DomainSpec, nics: list[NicTap], state: dict[str, Any]) -> None:
        """The source committed: the machine runs here as it ran there."""
        with self._lock:
            self.nics[spec.uuid] = nics
            self._next_pid += 1
            counters = {str(k): int(v) for k, v in dict(state.get("counters", {})).items()}
            machine = _Machine(spec, PowerState.RUNNING, self._next_pid, counters)
            self._machines[spec.uuid] = machine
            self._console[spec.uuid] = bytearray(str(state.get("console", "")).encode())
            self._emit(spec.uuid, K.STARTED, "migrated")
            if state.get("power") == PowerState.PAUSED.value:
                machine.state = PowerState.PAUSED
                self._emit(spec.uuid, K.PAUSED, "migrated")

    def cancel_incoming(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            incoming = self._incoming.get(domain_id)
            machine = self._machines.get(domain_id)
            if (incoming is not None and incoming.running) or (
                machine is not None and machine.state is not PowerState.SHUTOFF
            ):
                raise DriverError(f"domain {domain_id} already runs here", "conflict")
            if incoming is None:
                return
            incoming.cancel()
            del self._incoming[domain_id]

    def migrate_out(
        self,
        domain_id: uuid.UUID,
        target: IncomingMachine,
        params: MigrationParams,
        progress: Callable[[MigrationStats], None],
        copy_disks: Sequence[int] = (),
    ) -> MigrationOutcome:
        del copy_disks  # no disks: nothing to copy
        with self._lock:
            machine = self._machine(domain_id)
            if domain_id in self._outgoing:
                raise DriverError(f"domain {domain_id} is migrating already", "conflict")
            job = self._outgoing[domain_id] = Outgoing(params)
        stream = Stream(domain_id, target, job, machine.spec.memory_mib << 20, progress)
        paused_at: float | None = None
        try:
            stream.open()
            stream.report("setup", stream.memory_bytes)
            stream.precopy()
            with self._lock:
                stream.check_cancelled()
                machine = self._machine(domain_id)
                state = {
                    "power": machine.state.value,
                    "console": bytes(self._console.get(domain_id, b"")).decode("utf-8", "replace"),
                    "counters": machine.counters,
                }
                paused_at = time.monotonic()
                if machine.state is not PowerState.PAUSED:
                    machine.state = PowerState.PAUSED
                    self._emit(domain_id, K.PAUSED, "migrating")
            stream.report("stopcopy", 0)
            stream.send_state(state)
            stream.check_cancelled()
            downtime_ms = stream.commit()
            with self._lock:
                machine.state = PowerState.SHUTOFF
                self._machines.pop(domain_id, None)
                self._emit(domain_id, K.STOPPED, "migrated")
            paused_ms = (time.monotonic() - paused_at) * 1e3
            return outcome(stream, True, "done", paused_ms, downtime_ms=downtime_ms)
        except (StreamError, OSError) as exc:
            if job.committed:
                raise DriverError(
                    f"the target never confirmed the commit: {exc}", "migration_unconfirmed"
                ) from None
            paused_ms = None
            with self._lock:
                if paused_at is not None:
                    paused_ms = (time.monotonic() - paused_at) * 1e3
                    if state["power"] != PowerState.PAUSED.value:
                        machine.state = PowerState.RUNNING
                        self._emit(domain_id, K.RESUMED, "migration_failed")
            phase = "cancelled" if job.cancelled.is_set() else "failed"
            return outcome(stream, False, phase, paused_ms, error=str(exc))
        finally:
            stream.close()
            with self._lock:
                self._outgoing.pop(domain_id, None)

    def migration_set(
        self,
        domain_id: uuid.UUID,
        *,
        max_downtime_ms: float | None = None,
        bandwidth_mibps: int | None = None,
    ) -> None:
        with self._lock:
            job = self._outgoing.get(domain_id)
            if job is None:
                raise DriverError(f"no migration of domain {domain_id} runs", "conflict")
            update: dict[str, object] = {}
            if max_downtime_ms is not None:
                update["max_downtime_ms"] = max_downtime_ms
            if bandwidth_mibps is not None:
                update["bandwidth_mibps"] = bandwidth_mibps
            job.params = job.params.model_copy(update=update)

    def migration_cancel(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            job = self._outgoing.get(domain_id)
            if job is not None and not job.committed:
                job.cancelled.set()

    def migration_params(self, domain_id: uuid.UUID) -> MigrationParams | None:
        """The running migration's parameters as last set (tests look)."""
        with self._lock:
            job = self._outgoing.get(domain_id)
            return None if job is None else job.params

    # ---- the guest's part ---------------------------------------------------------------

    def guest_poweroff(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            self._machine(domain_id)
            self._poweroff(domain_id, "guest")

    def _poweroff(self, domain_id: uuid.UUID, by: str) -> None:
        machine = self._machines[domain_id]
        self._emit(domain_id, K.SHUTDOWN, "acpi_s5", by)
        self._apply(machine, machine.spec.on_poweroff, stopped_reason="shutdown")

    def guest_reboot(self, domain_id: uuid.UUID, reason: str = "i8042_reset") -> None:
        with self._lock:
            machine = self._machine(domain_id)
            if machine.spec.on_reboot is LifecycleAction.RESTART:
                machine.state = PowerState.RUNNING
                machine.counters["resets"] = machine.counters.get("resets", 0) + 1
                self._emit(domain_id, K.REBOOTED, reason)
            else:
                machine.state = PowerState.SHUTOFF
                self._emit(domain_id, K.STOPPED, "shutdown", "reboot")

    def guest_panic(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            machine = self._machine(domain_id)
            self._emit(domain_id, K.CRASHED, "pvpanic")
            if machine.spec.on_crash is LifecycleAction.PRESERVE:
                machine.state = PowerState.CRASHED
                return
            self._apply(machine, machine.spec.on_crash, stopped_reason="crashed")

    def machine_dies(self, domain_id: uuid.UUID) -> None:
        """The machine's process vanished (kill -9)."""
        with self._lock:
            machine = self._machine(domain_id)
            machine.state = PowerState.SHUTOFF
            self._emit(domain_id, K.STOPPED, "failed", "machine process died")

    def _apply(self, machine: _Machine, action: LifecycleAction, stopped_reason: str) -> None:
        domain_id = machine.spec.uuid
        if action is LifecycleAction.RESTART:
            machine.state = PowerState.RUNNING
            self._emit(domain_id, K.STARTED, detail="restarted")
        else:
            machine.state = PowerState.SHUTOFF
            self._emit(domain_id, K.STOPPED, stopped_reason)


def _read_state(directory: Path, spec: DomainSpec) -> dict[str, str]:
    """The fake machine state in `directory`, checked; DriverError(`invalid`) if it is
    missing, corrupt, of a newer format or of another machine config."""

    def refuse(why: str) -> DriverError:
        return DriverError(f"saved state in {directory.name}: {why}", "invalid")

    try:
        outer = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        text, digest = outer["body"], outer["sha256"]
    except FileNotFoundError:
        raise refuse("no machine state") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise refuse("unreadable (corrupt)") from None
    if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != digest:
        raise refuse("bad checksum (corrupt)")
    body = json.loads(text)
    if body["format"] > STATE_FORMAT:
        raise refuse(f"format {body['format']} is newer than {STATE_FORMAT}")
    if (body["domain_id"], body["vcpus"], body["memory_mib"]) != (
        str(spec.uuid),
        spec.vcpus,
        spec.memory_mib,
    ):
        raise refuse("taken from another machine config")
    return {"state": str(body["state"]), "console": str(body["console"])}
