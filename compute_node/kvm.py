"""The KVM driver: one VMM process per guest (compute_node.vmm), watched through its journal.

Each domain has a directory `<state>/domains/<uuid>/` with `vmm.json` (the launch config), the
VMM's control socket, its journal and console log. The VMM applies the lifecycle policies
itself and journals every change; a watcher thread per machine (compute_node.vmm_watch)
follows the journal and hands each record to the worker's sink.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

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
from compute_node.hostinfo import kvm_kind, physical_resources
from compute_node.kvm_state import check_state, discard_state, saved_power, write_saved
from compute_node.net import tap
from compute_node.vmm import client as vmm_client
from compute_node.vmm import protocol
from compute_node.vmm.config import (
    ConfigInvalid,
    DiskConfig,
    IncomingConfig,
    LaunchConfig,
    RestoreConfig,
    load_config,
)
from compute_node.vmm.frames import CONFIG_FILE, CONSOLE_LOG, JOURNAL, JournalRecord
from compute_node.vmm_watch import RECORD_TIMEOUT_S, Watch
from compute_node.warm_vmms import WarmVmms
from native.migration import STREAM_VERSION
from protos.commands import RebootMode, ShutdownMode
from protos.domain import DomainSpec, PowerState
from protos.host import Resources
from protos.migration import MIGRATION_PROGRESS_S, MigrationParams

log = structlog.get_logger("flotilla.compute.kvm")

# A save writes guest RAM (dirty pages only) at disk speed: minutes for a large guest on a
# slow disk; a snapshot's disks are copied within this hold, else the VMM lets the guest go on.
SAVE_TIMEOUT_S = 600.0
SNAPSHOT_HOLD_S = 300.0
# How long a VMM prepared for an incoming migration waits for its source and stream.
INCOMING_TIMEOUT_S = 3600.0
# cgroup v2 limits per VMM: at most its vCPU count of host CPU time, and its guest RAM plus
# room for the VMM process itself (Python, cffi, the console ring: ~14 MiB measured).
CPU_PERIOD_US = 100_000
VMM_OVERHEAD_MIB = 64
SPARES_DIR = "vmm-spares"
_STATES = {
    "running": PowerState.RUNNING,
    "paused": PowerState.PAUSED,
    "shutoff": PowerState.SHUTOFF,
    "crashed": PowerState.CRASHED,
}


class KvmDriver(Driver):
    def __init__(
        self,
        domains_dir: Path,
        spawn_timeout: float = vmm_client.SPAWN_TIMEOUT,
        *,
        warm_vmms: int = 0,
    ) -> None:
        """`warm_vmms`: spare VMM processes kept ready (compute_node/warm_vmms.py), in
        `<domains_dir>/../vmm-spares`; leftovers of an earlier driver there are ended even
        with 0 (the node's setting `warm_vmms` defaults to 1)."""
        self.domains_dir = domains_dir
        self.spawn_timeout = spawn_timeout
        domains_dir.mkdir(parents=True, exist_ok=True)
        self.warm = WarmVmms(
            domains_dir.parent / SPARES_DIR, warm_vmms, ready_timeout=spawn_timeout
        )
        self._sink: EventSink | None = None
        self._watches: dict[uuid.UUID, Watch] = {}
        self._lock = threading.Lock()
        self._kind = kvm_kind()

    # ---- plumbing ------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return Capabilities(
            kvm=self._kind,
            max_vcpus=64,
            console_attach=True,
            save_restore=True,
            live_migration=True,
        )

    def host_resources(self) -> Resources:
        return physical_resources()

    def set_event_sink(self, sink: EventSink) -> None:
        self._sink = sink

    def directory(self, domain_id: uuid.UUID) -> Path:
        return self.domains_dir / str(domain_id)

    def deliver(self, domain_id: uuid.UUID, record: JournalRecord) -> None:
        assert self._sink is not None, "set_event_sink first"
        try:
            kind = GuestEventKind(record["kind"])
        except ValueError:
            log.warning("unknown journal record", record=record)
            return
        self._sink(
            GuestEvent(
                domain_id, record["n"], kind, record["reason"], record["detail"], record["ts"]
            )
        )

    @staticmethod
    def ended_cleanly(directory: Path) -> bool:
        records = vmm_client.read_journal(directory / JOURNAL)
        return bool(records) and records[-1]["kind"] in ("stopped", "failed")

    def forget_watch(self, domain_id: uuid.UUID, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(domain_id) is watch:
                del self._watches[domain_id]

    def _client(self, domain_id: uuid.UUID) -> vmm_client.VmmClient:
        return vmm_client.VmmClient(self.directory(domain_id))

    def _watch(self, domain_id: uuid.UUID) -> Watch:
        with self._lock:
            watch = self._watches.get(domain_id)
        if watch is None:
            raise DomainNotRunning(domain_id)
        return watch

    def _request(self, domain_id: uuid.UUID, request: protocol.Request) -> int:
        """Send `request`; return the journal position after it, to wait for its records
        (the largest int when the VMM is gone by then: wait for its end)."""
        client = self._client(domain_id)
        try:
            client.request(request)
        except vmm_client.VmmGone:
            raise DomainNotRunning(domain_id) from None
        except vmm_client.VmmRequestError as exc:
            raise DriverError(exc.message, exc.code) from None
        except vmm_client.VmmClientError as exc:
            raise DriverError(str(exc)) from None
        try:
            return int(client.status().journal_n)
        except vmm_client.VmmClientError:
            return sys.maxsize  # the machine ended right after the request

    # ---- the contract ---------------------------------------------------------------------

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        return self._launch(spec, files, paused, nics, None)

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
        check_state(directory, spec)
        if paused is None:
            paused = saved_power(directory) is PowerState.PAUSED
        # Absolute: the VMM resolves names from its domain dir.
        restore = RestoreConfig(str(directory.absolute()), paused, detail)
        return self._launch(spec, files, paused, nics, restore)

    def _launch(
        self,
        spec: DomainSpec,
        files: BootFiles,
        paused: bool,
        nics: Sequence[NicTap],
        restore: RestoreConfig | None,
        *,
        incoming: IncomingConfig | None = None,
    ) -> RuntimeInfo:
        if files.kernel is None:
            raise DriverError("no kernel was opened for the domain", "invalid")
        if len(nics) != len(spec.nics):
            raise DriverError(
                f"{len(spec.nics)} NIC(s) in the spec but {len(nics)} plugged", "invalid"
            )
        self._end_kept(spec.uuid)  # its flock on the dir would refuse the new VMM
        # The VMM inherits one queue of each NIC's tap, opened here where the plumbing
        # lives (a data-plane namespace, if any), and keeps it for the machine's life.
        taps = self._open_taps(nics)
        try:
            with self.warm.reporting():  # the next spare is made after this start
                return self._spawn(
                    spec,
                    files,
                    paused=paused,
                    nics=nics,
                    taps=taps,
                    restore=restore,
                    incoming=incoming,
                )
        finally:
            for fd in taps:
                os.close(fd)

    @staticmethod
    def _open_taps(nics: Sequence[NicTap]) -> list[int]:
        fds: list[int] = []
        try:
            fds.extend(tap.open_queue(nic.tap, netns_name=nic.netns) for nic in nics)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise DriverError(f"cannot open a NIC's tap: {exc}", "spawn_failed") from None
        return fds

    def _spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool,
        nics: Sequence[NicTap],
        taps: list[int],
        restore: RestoreConfig | None,
        incoming: IncomingConfig | None,
    ) -> RuntimeInfo:
        assert files.kernel is not None  # checked by _launch
        directory = self.directory(spec.uuid)
        directory.mkdir(parents=True, exist_ok=True)
        config = LaunchConfig(
            domain_id=str(spec.uuid),
            name=spec.name,
            # The VMM inherits the descriptors the worker opened and checked, and reads the
            # files through them (also when a policy restarts the machine).
            kernel=files.kernel.fd_path,
            initrd=files.initrd.fd_path if files.initrd else None,
            cmdline=spec.boot.cmdline,
            # virtio-blk slots in target order; the VMM's device opens each through the
            # worker's descriptor and takes the volume's OFD lock (one writer, readers shared).
            disks=[DiskConfig(d.fd_path, d.read_only, d.disk_id) for d in files.disks],
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            on_poweroff=spec.on_poweroff.value,
            on_reboot=spec.on_reboot.value,
            on_crash=spec.on_crash.value,
            console_ring_bytes=spec.serial.ring_kib * 1024,
            console_log=spec.serial.log,
            start_paused=paused,
            # Applied where the host has cgroup v2; elsewhere the VMM runs without limits and
            # says why in its status (cgroup_error).
            cgroup={
                "cpu_max": f"{spec.vcpus * CPU_PERIOD_US} {CPU_PERIOD_US}",
                "memory_max": (spec.memory_mib + VMM_OVERHEAD_MIB) * 1024 * 1024,
            },
            nics=tuple((fd, nic.mac) for fd, nic in zip(taps, nics, strict=True)),
            restore=restore,
            incoming=incoming,
        )
        config.write(str(directory))
        before = _last_n(directory)
        try:
            # On a warm VMM when one is ready, else cold: the same process either way.
            pid = self.warm.launch(directory, [*files.fds(), *taps], self.spawn_timeout)
        except vmm_client.VmmSpawnError as exc:
            raise DriverError(_named(exc.reason, files), exc.code) from None
        watch = Watch(self, spec.uuid, directory, pid, incoming=incoming is not None)
        with self._lock:
            self._watches[spec.uuid] = watch
        try:
            until = watch.start(before)
        except vmm_client.VmmClientError:
            # Gone already (a guest that powered off at once): its journal says how.
            watch.ended()
            return self.get_info(spec.uuid)
        if until is None:  # an older VMM: ask
            try:
                until = int(self._client(spec.uuid).status().journal_n)
            except vmm_client.VmmClientError:
                until = sys.maxsize  # ended meanwhile: wait for the watch to see its end
        if not watch.wait_for(until):
            # Not left running behind a failure the caller will act on (retry elsewhere).
            self._kill(spec.uuid, pid, watch)
            raise DriverError("the VMM started but reported nothing in time", "spawn_failed")
        return self.get_info(spec.uuid)

    def _kill(self, domain_id: uuid.UUID, pid: int, watch: Watch) -> None:
        try:
            self._client(domain_id).destroy()
        except vmm_client.VmmClientError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with watch.cond:
            watch.cond.wait_for(lambda: watch.finished, RECORD_TIMEOUT_S)

    def adopt(self, domain_id: uuid.UUID, after_n: int) -> RuntimeInfo | None:
        directory = self.directory(domain_id)
        if not directory.is_dir():
            return None
        client = self._client(domain_id)
        try:
            status = client.status()
        except vmm_client.VmmClientError:
            status = None
        if status is None:
            # Gone while we were away: account for what it journaled, and for its death.
            watch = Watch(self, domain_id, directory, None)
            watch.delivered = after_n
            watch.ended("the VMM process died while the compute node was down")
            return RuntimeInfo(state=PowerState.SHUTOFF)
        watch = Watch(self, domain_id, directory, None, incoming=status.incoming_port is not None)
        with self._lock:
            self._watches[domain_id] = watch
        watch.start(after_n)
        watch.wait_for(int(status.journal_n))
        return self.get_info(domain_id)

    def process_stays(self, event: GuestEvent) -> bool:
        # The VMM keeps running after `stopped` (shutdown, poweroff|reboot) when the policy
        # it was started with (its vmm.json, not a later redefinition) is preserve.
        if event.kind is not GuestEventKind.STOPPED or event.reason != "shutdown":
            return False
        try:
            config = load_config(str(self.directory(event.domain_id) / CONFIG_FILE))
        except ConfigInvalid:
            return False
        policy = {"poweroff": config.on_poweroff, "reboot": config.on_reboot}
        return policy.get(event.detail) == "preserve"

    def _end_kept(self, domain_id: uuid.UUID) -> None:
        """End a VMM that stays without a machine (a preserve policy) and wait until it is
        gone; nothing if no VMM answers. DriverError `conflict` if it still has a machine."""
        client = self._client(domain_id)
        try:
            status = client.status()
        except vmm_client.VmmGone:
            return
        except vmm_client.VmmClientError as exc:
            raise DriverError(str(exc)) from None
        if status.state != "shutoff":
            raise DriverError(f"domain {domain_id} still has a {status.state} machine", "conflict")
        with self._lock:
            watch = self._watches.get(domain_id)
        try:
            client.destroy()
        except vmm_client.VmmGone:
            pass
        except vmm_client.VmmClientError as exc:
            raise DriverError(str(exc)) from None
        if watch is not None:
            with watch.cond:
                watch.cond.wait_for(lambda: watch.finished, RECORD_TIMEOUT_S)
        if not _wait_gone(status.pid, RECORD_TIMEOUT_S):
            raise DriverError(f"the kept VMM of {domain_id} (pid {status.pid}) did not exit")

    def destroy(self, domain_id: uuid.UUID) -> None:
        watch = self._watch(domain_id)
        self._request(domain_id, protocol.Destroy())
        with watch.cond:
            watch.cond.wait_for(lambda: watch.finished, RECORD_TIMEOUT_S)

    def shutdown(self, domain_id: uuid.UUID, mode: ShutdownMode) -> None:
        self._watch(domain_id)
        self._request(domain_id, protocol.Shutdown(mode.value))

    def reboot(self, domain_id: uuid.UUID, mode: RebootMode) -> None:
        watch = self._watch(domain_id)
        watch.wait_for(self._request(domain_id, protocol.Reboot(mode.value)))

    def pause(self, domain_id: uuid.UUID) -> None:
        watch = self._watch(domain_id)
        watch.wait_for(self._request(domain_id, protocol.Pause()))

    def resume(self, domain_id: uuid.UUID) -> None:
        watch = self._watch(domain_id)
        watch.wait_for(self._request(domain_id, protocol.Resume()))

    def save(self, domain_id: uuid.UUID, directory: Path) -> SavedMachine:
        watch = self._watch(domain_id)
        try:
            saved = self._client(domain_id).save(directory, timeout=SAVE_TIMEOUT_S)
        except vmm_client.VmmClientError as exc:
            discard_state(directory)
            if isinstance(exc, vmm_client.VmmGone):
                # Killed mid-save: its watch reports the death (stopped/failed).
                self._wait_finished(watch)
            raise _save_error(exc, "save") from None
        self._wait_finished(watch)  # stopped/saved delivered, the VMM gone
        machine = SavedMachine(True, PowerState(saved.power), saved.pause_ms)
        write_saved(directory, machine)
        return machine

    def snapshot(
        self, domain_id: uuid.UUID, directory: Path | None, during: Callable[[], None]
    ) -> SavedMachine:
        self._watch(domain_id)
        try:
            held = self._client(domain_id).snapshot(directory, SNAPSHOT_HOLD_S)
        except vmm_client.VmmClientError as exc:
            discard_state(directory)
            raise _save_error(exc, "snapshot") from None
        try:
            with held:
                during()
                saved = held.proceed()
        except vmm_client.VmmClientError as exc:
            discard_state(directory)
            raise _save_error(exc, "snapshot") from None
        except BaseException:
            discard_state(directory)  # closing the connection let the machine go on
            raise
        machine = SavedMachine(directory is not None, PowerState(saved.power), saved.pause_ms)
        if directory is not None:
            write_saved(directory, machine)
        return machine

    @staticmethod
    def _wait_finished(watch: Watch) -> None:
        with watch.cond:
            watch.cond.wait_for(lambda: watch.finished, RECORD_TIMEOUT_S)

    # ---- live migration (docs/migration.md, "The control plane") ------------------------

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
        token = secrets.token_hex(32)
        incoming = IncomingConfig(
            listen, 0, token, paused, INCOMING_TIMEOUT_S, tuple(sorted(set(copy_disks)))
        )
        self._launch(spec, files, False, nics, None, incoming=incoming)
        try:
            port = self._client(spec.uuid).status().incoming_port
        except vmm_client.VmmClientError:
            port = None
        if port is None:
            raise DriverError("the VMM for the incoming migration ended at once", "spawn_failed")
        return IncomingMachine(listen, port, token, STREAM_VERSION)

    def cancel_incoming(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            watch = self._watches.get(domain_id)
        if watch is None:
            return
        try:
            self._client(domain_id).request(protocol.CancelIncoming())
        except vmm_client.VmmGone:
            pass
        except vmm_client.VmmRequestError as exc:
            raise DriverError(exc.message, "conflict") from None
        except vmm_client.VmmClientError as exc:
            raise DriverError(str(exc)) from None
        self._wait_finished(watch)

    def migrate_out(
        self,
        domain_id: uuid.UUID,
        target: IncomingMachine,
        params: MigrationParams,
        progress: Callable[[MigrationStats], None],
        copy_disks: Sequence[int] = (),
    ) -> MigrationOutcome:
        watch = self._watch(domain_id)
        client = self._client(domain_id)
        request = protocol.MigrateOut(
            address=target.address,
            port=target.port,
            token=target.token,
            max_downtime_ms=params.max_downtime_ms,
            bandwidth=params.bandwidth_mibps << 20,
            auto_converge=params.auto_converge,
            verify=params.verify,
            timeout_s=params.timeout_s or 0.0,
            timeout_action=params.timeout_action.value,
            copy_disks=tuple(sorted(set(copy_disks))),
            stream_version=target.stream_version,
        )
        stop = threading.Event()
        poller = threading.Thread(
            target=_poll_progress, args=(client, progress, stop), name=f"migrate-{domain_id}"
        )
        poller.start()
        try:
            reply = client.migrate_out(request)
        except vmm_client.VmmGone:
            self._wait_finished(watch)  # its death is reported (stopped/failed)
            raise DriverError("the VMM died during the migration", "internal") from None
        except vmm_client.VmmRequestError as exc:
            code = "conflict" if exc.code in ("state", "busy") else exc.code
            raise DriverError(f"migrate: {exc.message}", code) from None
        except vmm_client.VmmClientError as exc:
            raise DriverError(f"migrate: {exc}") from None
        finally:
            stop.set()
            poller.join()
        stats = _stats(reply)
        if reply.committed and reply.error is None:
            self._wait_finished(watch)  # stopped/migrated delivered, the VMM gone
            return MigrationOutcome(True, "done", stats, reply.downtime_ms, reply.paused_ms)
        try:
            watch.wait_for(int(client.status().journal_n))  # paused, resumed delivered
        except vmm_client.VmmClientError:
            self._wait_finished(watch)
        if reply.committed:
            raise DriverError(reply.error or "unconfirmed", "migration_unconfirmed")
        return MigrationOutcome(False, reply.phase, stats, error=reply.error)

    def migration_set(
        self,
        domain_id: uuid.UUID,
        *,
        max_downtime_ms: float | None = None,
        bandwidth_mibps: int | None = None,
    ) -> None:
        self._watch(domain_id)
        bandwidth = None if bandwidth_mibps is None else bandwidth_mibps << 20
        try:
            self._client(domain_id).request(protocol.MigrationSet(max_downtime_ms, bandwidth))
        except vmm_client.VmmGone:
            raise DomainNotRunning(domain_id) from None
        except vmm_client.VmmRequestError as exc:
            code = "conflict" if exc.code == "state" else exc.code
            raise DriverError(exc.message, code) from None
        except vmm_client.VmmClientError as exc:
            raise DriverError(str(exc)) from None

    def migration_cancel(self, domain_id: uuid.UUID) -> None:
        try:
            self._client(domain_id).request(protocol.MigrationCancel())
        except vmm_client.VmmClientError:
            pass  # none runs (or no VMM): nothing to cancel

    def get_info(self, domain_id: uuid.UUID) -> RuntimeInfo:
        try:
            status = self._client(domain_id).status()
        except vmm_client.VmmClientError:
            return RuntimeInfo(state=PowerState.SHUTOFF)
        return RuntimeInfo(
            state=_STATES.get(status.state, PowerState.NOSTATE),
            pid=status.pid,
            cpu_time_ns=status.cpu_time_ns,
        )

    def console(self, domain_id: uuid.UUID, max_bytes: int) -> tuple[bytes, bool]:
        try:
            snapshot = self._client(domain_id).console(max_bytes)
            return snapshot.data, snapshot.truncated
        except vmm_client.VmmClientError:
            pass
        path = self.directory(domain_id) / CONSOLE_LOG
        try:
            with path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - max_bytes))
                return f.read(), size > max_bytes
        except OSError:
            return b"", False

    def remove(self, domain_id: uuid.UUID) -> None:
        self._end_kept(domain_id)
        shutil.rmtree(self.directory(domain_id), ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch.stop()
        self.warm.close()


def _save_error(exc: vmm_client.VmmClientError, what: str) -> DriverError:
    if isinstance(exc, vmm_client.VmmRequestError):
        return DriverError(f"{what}: {exc.message}", exc.code)
    if isinstance(exc, vmm_client.VmmGone):
        return DriverError(f"{what}: the VMM died before it finished; nothing was kept")
    return DriverError(f"{what}: {exc}")


def _stats(reply: protocol.MigrationReply) -> MigrationStats:
    return MigrationStats(
        phase=reply.phase,
        iteration=reply.iteration,
        bytes_sent=reply.bytes_sent,
        remaining_bytes=reply.remaining_bytes,
        memory_bytes=reply.memory_bytes,
        dirty_rate=reply.dirty_rate,
        bandwidth=reply.bandwidth,
        predicted_ms=reply.predicted_ms,
        throttle_pct=reply.throttle_pct,
        elapsed_ms=reply.elapsed_ms,
    )


def _poll_progress(
    client: vmm_client.VmmClient,
    progress: Callable[[MigrationStats], None],
    stop: threading.Event,
) -> None:
    """Hands the running migration's figures to `progress` every MIGRATION_PROGRESS_S until
    `stop` (the outcome is migrate_out's to report)."""
    while not stop.wait(MIGRATION_PROGRESS_S):
        try:
            reply = client.migration_status()
        except vmm_client.VmmClientError:
            return
        if reply.ended:
            return
        try:
            progress(_stats(reply))
        except Exception:
            log.exception("migration progress callback failed")


def _named(reason: str, files: BootFiles) -> str:
    """The VMM's reason with the spec's paths in place of the descriptors it read."""
    for opened in files.files:
        reason = reason.replace(opened.fd_path, opened.given)
    return reason


def _wait_gone(pid: int, timeout: float) -> bool:
    """Until process `pid` has exited (reaped if it was our child); False on timeout."""
    if vmm_client.wait_exit(pid, timeout) is not None:
        return True  # our child, reaped now
    # Not our child (adopted, or reaped by its watch already): wait until it is gone.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.01)
    return False


def _last_n(directory: Path) -> int:
    records = vmm_client.read_journal(directory / JOURNAL)
    return records[-1]["n"] if records else 0
