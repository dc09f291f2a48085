"""What the VMM does for each request record (docs/vmm.md, "Control protocol"): one handler
per record type, each returning one reply record or raising ControlError."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compute_node.vmm import protocol as p
from compute_node.vmm.guest import EXIT_FAILED, EXIT_OK, Power
from compute_node.vmm.migration import Incoming, Outgoing, check
from native.machine import MachineState, ShutdownMethod, SnapshotStats

if TYPE_CHECKING:
    from compute_node.vmm.loop import Conn, Loop

_SHUTDOWN = {"ctrl-alt-del": ShutdownMethod.CTRL_ALT_DEL, "acpi": ShutdownMethod.ACPI}
# A snapshot hold longer than this is refused: a client that forgets it cannot pause a guest
# for longer.
HOLD_MAX_S = 600.0


class Hold:
    """A snapshot's pause, waiting for its client's `Proceed` (or close, or the deadline)."""

    __slots__ = ("conn", "deadline", "paused_at", "stats", "was")

    def __init__(
        self, conn: Conn, was: Power, paused_at: float, deadline: float, stats: SnapshotStats | None
    ) -> None:
        self.conn = conn
        self.was = was
        self.paused_at = paused_at
        self.deadline = deadline
        self.stats = stats


class Operations:
    """The handlers, keyed by request type; the held snapshot, if any."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.guest = loop.guest
        self.hold: Hold | None = None
        self.outgoing: Outgoing | None = None  # the running migration, or the last one
        self.incoming: Incoming | None = None  # set by the loop for an incoming VMM
        self.was = Power.RUNNING  # the machine's state when the outgoing migration began
        self._handlers: dict[type[Any], Callable[[Conn, Any], p.Reply | None]] = {
            p.Status: self.status,
            p.Pause: self.pause,
            p.Resume: self.resume,
            p.Shutdown: self.shutdown,
            p.Destroy: self.destroy,
            p.Reboot: self.reboot,
            p.Stats: self.stats,
            p.Console: self.console,
            p.Subscribe: self.subscribe,
            p.Attach: self.attach,
            p.Save: self.save,
            p.Snapshot: self.snapshot,
            p.Proceed: self.proceed,
            p.MigrateOut: self.migrate_out,
            p.MigrationStatus: self.migration_status,
            p.MigrationSet: self.migration_set,
            p.MigrationCancel: self.migration_cancel,
            p.CancelIncoming: self.cancel_incoming,
        }
        self.guest.before_event = self.settle_outgoing

    def handle(self, conn: Conn, request: p.Request) -> p.Reply | None:
        """The request's reply; None when it comes later on `conn` (MigrateOut)."""
        if type(request) in _CHANGES:
            if self.hold is not None:
                raise p.ControlError("busy", "a snapshot holds the machine paused")
            if self.migrating():
                raise p.ControlError("busy", "a migration of the machine is under way")
            if self.incoming is not None and self.guest.machine is None:
                raise p.ControlError("state", "waiting for an incoming migration")
        return self._handlers[type(request)](conn, request)

    # -- power ------------------------------------------------------------------------------

    def status(self, _conn: Conn, _req: p.Status) -> p.StatusReply:
        g = self.guest
        return p.StatusReply(
            state=str(g.power),
            pid=os.getpid(),
            cpu_time_ns=time.process_time_ns(),
            journal_n=g.journal.n,
            started_at=g.started_at,
            cgroup=self.loop.cgroup,
            cgroup_error=self.loop.cgroup_error,
            incoming_port=(
                self.incoming.port
                if self.incoming is not None and g.machine is None and not self.incoming.ended
                else None
            ),
        )

    def pause(self, _conn: Conn, _req: p.Pause) -> p.Done:
        g = self.guest
        if g.power is Power.PAUSED:
            return p.Done()
        if g.power is not Power.RUNNING:
            raise p.ControlError("state", f"cannot pause a {g.power} domain")
        g.pause()
        g.record("paused", "host")
        return p.Done()

    def resume(self, _conn: Conn, _req: p.Resume) -> p.Done:
        g = self.guest
        if g.power is Power.RUNNING:
            return p.Done()
        if g.power is not Power.PAUSED:
            raise p.ControlError("state", f"cannot resume a {g.power} domain")
        g.resume()
        g.record("resumed", "host")
        return p.Done()

    def shutdown(self, _conn: Conn, req: p.Shutdown) -> p.Done:
        g = self.guest
        method = _SHUTDOWN.get(req.mode)
        if method is None:
            raise p.ControlError(
                "bad_request", f"shutdown mode must be one of {', '.join(_SHUTDOWN)}"
            )
        if g.power is not Power.RUNNING:
            raise p.ControlError("state", f"cannot shut down a {g.power} domain")
        g.need_machine().shutdown(method)
        g.shutdown_requested = True
        return p.Done()

    def destroy(self, _conn: Conn, _req: p.Destroy) -> p.Done:
        self.hold = None  # a hard stop ends a held snapshot too
        self.settle_outgoing()
        self.stop_incoming()
        self.guest.destroy("host")
        return p.Done()

    def reboot(self, _conn: Conn, req: p.Reboot) -> p.Done:
        g = self.guest
        if req.mode == "reset":
            if g.power is Power.SHUTOFF:
                raise p.ControlError("state", "cannot reset a shutoff domain")
            g.restart()
            g.record("rebooted", "host", "reset")
        elif req.mode == "ctrl-alt-del":
            if g.power is not Power.RUNNING:
                raise p.ControlError("state", f"cannot reboot a {g.power} domain")
            g.need_machine().shutdown(ShutdownMethod.CTRL_ALT_DEL)
            g.reboot_requested = True
        else:
            raise p.ControlError("bad_request", "reboot mode must be reset or ctrl-alt-del")
        return p.Done()

    # -- inspection -------------------------------------------------------------------------

    def stats(self, _conn: Conn, _req: p.Stats) -> p.StatsReply:
        c = self.guest.need_machine().counters()
        return p.StatsReply(
            {
                "exits": c.exits,
                "unhandled_io": c.unhandled_io,
                "unhandled_mmio": c.unhandled_mmio,
                "console_in_bytes": c.console_in_bytes,
                "console_out_bytes": c.console_out_bytes,
                "console_dropped": c.console_dropped,
                "devices": {name: d._asdict() for name, d in c.devices.items()},
                "cpu_time_ns": time.process_time_ns(),
            }
        )

    def console(self, _conn: Conn, req: p.Console) -> p.ConsoleReply:
        max_bytes = self.guest.config.console_ring_bytes if req.max_bytes is None else req.max_bytes
        if max_bytes < 0:
            raise p.ControlError("bad_request", "max_bytes must be a non-negative integer")
        self.loop.drain_console()  # include what the guest wrote just now
        data, truncated = self.guest.console.snapshot(max_bytes)
        return p.ConsoleReply(data, truncated)

    def subscribe(self, conn: Conn, req: p.Subscribe) -> p.Done:
        if req.from_n < 0:
            raise p.ControlError("bad_request", "from_n must be a non-negative integer")
        conn.mode = "subscribe"
        conn.from_n = req.from_n
        return p.Done(journal_n=self.guest.journal.n)

    def attach(self, conn: Conn, _req: p.Attach) -> p.Done:
        if self.loop.attached is not None:
            raise p.ControlError("busy", "another client is attached to the console")
        conn.mode = "attach"
        self.loop.attached = conn
        return p.Done()

    # -- save and snapshots -----------------------------------------------------------------

    def save(self, _conn: Conn, req: p.Save) -> p.Saved:
        g = self.guest
        was = g.hold_for_save()
        paused_at = time.monotonic()
        stats = g.write_state(req.directory, was)
        pause_ms = (time.monotonic() - paused_at) * 1000
        g.saved(was)
        return p.Saved(str(was), pause_ms, stats.state_bytes, stats.memory_pages)

    def snapshot(self, conn: Conn, req: p.Snapshot) -> p.Held:
        if not 0 < req.hold_s <= HOLD_MAX_S:
            raise p.ControlError("bad_request", f"hold_s must be in (0, {HOLD_MAX_S:g}]")
        g = self.guest
        if req.directory is not None and g.power is Power.RUNNING and g.machine_started:
            # Memory is written while the guest runs; it is paused for the last pass and
            # its state only, and stays paused while the client copies its disks.
            was: Power = g.power
            written = g.write_state(req.directory, was, live=True)
            paused_at = time.monotonic() - written.paused_ms / 1000
            stats: SnapshotStats | None = written
        else:
            was = g.hold_for_save()
            paused_at = time.monotonic()
            stats = None if req.directory is None else g.write_state(req.directory, was)
        self.hold = Hold(conn, was, paused_at, time.monotonic() + req.hold_s, stats)
        return p.Held(
            str(was),
            0 if stats is None else stats.state_bytes,
            0 if stats is None else stats.memory_pages,
        )

    def proceed(self, conn: Conn, _req: p.Proceed) -> p.Saved:
        hold = self.hold
        if hold is None or hold.conn is not conn:
            raise p.ControlError("state", "this connection holds no snapshot (it expired?)")
        self.release()
        stats = hold.stats
        return p.Saved(
            str(hold.was),
            (time.monotonic() - hold.paused_at) * 1000,
            0 if stats is None else stats.state_bytes,
            0 if stats is None else stats.memory_pages,
        )

    def release(self) -> None:
        """Ends the held snapshot: the machine goes on as it was (on Proceed, on the
        connection's close, at the deadline)."""
        hold, self.hold = self.hold, None
        if hold is not None:
            self.guest.release(hold.was)

    def deadline(self) -> float | None:
        return None if self.hold is None else self.hold.deadline

    # -- live migration (docs/vmm.md, "Live migration") --------------------------------------

    def migrating(self) -> bool:
        return self.outgoing is not None and self.outgoing.conn is not None

    def migrate_out(self, conn: Conn, req: p.MigrateOut) -> None:
        check(req)
        g = self.guest
        if g.power not in (Power.RUNNING, Power.PAUSED) or not g.machine_started:
            raise p.ControlError("state", f"cannot migrate a {g.power} domain that never ran")
        out = Outgoing(g.need_machine(), req, g.config.memory_mib << 20, self.loop.wake_w)
        out.conn = conn
        self.was = g.power
        self.outgoing = out
        conn.mode = "migrating"  # its reply comes when the migration ends
        out.start()

    def _outgoing(self) -> Outgoing:
        if self.outgoing is None:
            raise p.ControlError("state", "no migration of the machine was started")
        return self.outgoing

    def migration_status(self, _conn: Conn, _req: p.MigrationStatus) -> p.MigrationReply:
        return self._outgoing().reply()

    def migration_set(self, _conn: Conn, req: p.MigrationSet) -> p.MigrationReply:
        out = self._outgoing()
        if not self.migrating():
            raise p.ControlError("state", "no migration of the machine runs")
        out.set(req.max_downtime_ms, req.bandwidth)
        return out.reply()

    def migration_cancel(self, _conn: Conn, _req: p.MigrationCancel) -> p.MigrationReply:
        out = self._outgoing()
        out.cancel()
        return out.reply()

    def outgoing_ended(self) -> None:
        """The migration's thread ended: journal what happened to the machine, answer its
        MigrateOut. Committed and confirmed: `stopped`/migrated and the VMM exits; paused
        for the last pages and then failed: `resumed`/migration_failed (the engine resumed
        it, once it took its disks back: else it stays paused); committed but unconfirmed: it
        stays paused, only the target knows."""
        out = self.outgoing
        if out is None or out.conn is None:
            return
        out.join()
        g = self.guest
        reply = out.reply()
        if out.machine is g.machine:
            if reply.source_paused and self.was is Power.RUNNING:
                g.record("paused", "migrating")
                g.power = Power.PAUSED
            if out.result is not None:
                g.migrated_out()
            elif reply.committed:
                pass  # unconfirmed: stays paused until someone who knows the target decides
            elif (
                reply.source_paused
                and self.was is Power.RUNNING
                and out.machine.state() is MachineState.RUNNING
            ):
                g.power = Power.RUNNING
                g.record("resumed", "migration_failed")
            # else: paused still, its disks' locks taken by another process meanwhile (the
            # error says so): it stays paused, never a second writer.
        conn, out.conn = out.conn, None
        if not conn.closed:
            conn.out += self.loop.reply_frame(reply)
            conn.mode = "request"
            self.loop.update(conn)

    def settle_outgoing(self) -> None:
        """Ends a running migration before the machine changes under it (a destroy, a
        signal, a machine event): cancelled unless past its commit, waited for, journaled."""
        if self.migrating():
            assert self.outgoing is not None
            self.outgoing.cancel()
            self.outgoing_ended()

    def incoming_ended(self) -> None:
        """The incoming stream ended: the guest runs here now, or the process ends with
        no lifecycle record (nothing ran)."""
        inc = self.incoming
        if inc is None or not inc.ended or self.guest.machine is not None:
            return
        if inc.machine is not None:  # (also when a cancel came as it committed)
            self.guest.migrated_in(inc.machine, inc.cfg.paused)
            return
        print(f"compute_node.vmm: no incoming migration: {inc.error}", file=sys.stderr)
        inc.close()
        self.guest.exit_code = EXIT_OK if inc.cancelled else EXIT_FAILED

    def stop_incoming(self) -> None:
        """Stops waiting for an incoming migration (before a destroy); a stream that
        committed meanwhile runs its guest (journaled), for the destroy to end."""
        inc = self.incoming
        if inc is not None and self.guest.machine is None:
            inc.cancel()
            self.incoming_ended()

    def cancel_incoming(self, _conn: Conn, _req: p.CancelIncoming) -> p.Done:
        inc = self.incoming
        if inc is None:
            raise p.ControlError("state", "this VMM waits for no incoming migration")
        if self.guest.machine is None:
            inc.cancel()
            self.incoming_ended()
        if self.guest.machine is not None:
            raise p.ControlError("state", "the migrated guest runs here already")
        return p.Done()


# Requests that would change the machine while a snapshot holds it paused or a migration
# streams it (the engine holds the machine's control lock).
_CHANGES = (p.Pause, p.Resume, p.Shutdown, p.Reboot, p.Save, p.Snapshot, p.MigrateOut)
