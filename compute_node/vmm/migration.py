"""The VMM's live migrations (docs/vmm.md, "Live migration"): `Outgoing` streams this VMM's
machine to another VMM on a thread of its own while the control loop keeps answering;
`Incoming` waits on a `MigrationListener` for the machine a source streams here. Each tells
the loop it ended through `wake` (a byte on a socket the loop watches); the loop then
journals what happened, on its own thread like every record. Standard library and `native`.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

from compute_node.vmm import protocol as p
from compute_node.vmm.config import IncomingConfig
from native.machine import Disk, Machine, Nic
from native.migration import (
    STREAM_VERSION,
    STREAM_VERSION_MIN,
    Migration,
    MigrationError,
    MigrationListener,
    MigrationProgress,
    MigrationResult,
    migrate,
)

# A migration without a timeout (the engine's deadline saturates: ten days is none).
NO_TIMEOUT_S = 864_000.0
# The budget a `pause` timeout action sets: any pause fits, so the guest pauses at the next
# check and the rest copies without new dirt (protos.migration.MAX_DOWNTIME_MS).
PAUSE_BUDGET_MS = 60_000.0
TICK_S = 0.05
ACTIONS = ("abort", "pause")


def check(req: p.MigrateOut) -> None:
    """Refuses (ControlError `bad_request`) a request the engine must never see."""
    token_ok = len(req.token) == 64 and all(c in "0123456789abcdef" for c in req.token)
    why = (
        "port must be 1..65535"
        if not 0 < req.port <= 65535
        else "token must be 64 hex digits"
        if not token_ok
        else "max_downtime_ms must be in (0, 60000]"
        if not 0 < req.max_downtime_ms <= PAUSE_BUDGET_MS
        else "bandwidth must be >= 0"
        if req.bandwidth < 0
        else "timeout_s must be >= 0"
        if req.timeout_s < 0
        else f"timeout_action must be one of {', '.join(ACTIONS)}"
        if req.timeout_action not in ACTIONS
        else "copy_disks must be a list of disk indices"
        if not _indices(req.copy_disks)
        else f"stream_version must be {STREAM_VERSION_MIN}..{STREAM_VERSION}"
        if not STREAM_VERSION_MIN <= req.stream_version <= STREAM_VERSION
        else None
    )
    if why is not None:
        raise p.ControlError("bad_request", f"migrate_out: {why}")


def _indices(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 64 for i in value
    )


class Outgoing:
    """One migration of `machine` (running or paused) to the target `req` names."""

    def __init__(
        self, machine: Machine, req: p.MigrateOut, memory_bytes: int, wake: socket.socket
    ) -> None:
        self.machine = machine
        self.req = req
        self.memory_bytes = memory_bytes
        self.conn: Any = None  # the connection its reply goes to (the loop's Conn)
        self.control = Migration(max_downtime_ms=req.max_downtime_ms, bandwidth=req.bandwidth)
        self.started = time.monotonic()
        self.cancelled = False
        self.timed_out = False
        self.ended = False
        self.result: MigrationResult | None = None
        self.error: MigrationError | None = None
        self._wake = wake
        self._thread = threading.Thread(target=self._run, name="migrate-out", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        req = self.req
        timeout = req.timeout_s if req.timeout_s > 0 and req.timeout_action == "abort" else 0
        try:
            self.result = migrate(
                self.machine,
                (req.address, req.port),
                req.token,
                control=self.control,
                timeout=timeout or NO_TIMEOUT_S,
                debug=req.verify,
                auto_converge=req.auto_converge,
                progress=self._tick,
                progress_interval=TICK_S,
                copy_disks=list(req.copy_disks),
                stream_version=req.stream_version,
            )
        except MigrationError as exc:
            self.error = exc
        except Exception as exc:  # a bug must still end the migration, never the VMM
            self.error = MigrationError(f"migration: {exc!r}", errno.EIO)
        finally:
            self.ended = True
            try:
                self._wake.send(b"m")
            except OSError:
                pass  # the loop is gone (the process ends)

    def _tick(self, progress: MigrationProgress) -> None:
        req = self.req
        if (
            req.timeout_action == "pause"
            and req.timeout_s > 0
            and not self.timed_out
            and progress.phase == "precopy"
            and progress.elapsed_ms >= req.timeout_s * 1000
        ):
            self.timed_out = True
            self.control.set_max_downtime(PAUSE_BUDGET_MS)

    def join(self) -> None:
        self._thread.join()

    def cancel(self) -> None:
        if not self.ended:
            self.cancelled = True
            self.control.cancel()

    def set(self, max_downtime_ms: float | None, bandwidth: int | None) -> None:
        if max_downtime_ms is not None:
            if not 0 < max_downtime_ms <= PAUSE_BUDGET_MS:
                raise p.ControlError("bad_request", "max_downtime_ms must be in (0, 60000]")
            self.control.set_max_downtime(max_downtime_ms)
        if bandwidth is not None:
            if bandwidth < 0:
                raise p.ControlError("bad_request", "bandwidth must be >= 0")
            self.control.set_bandwidth(bandwidth)

    @property
    def committed(self) -> bool:
        return self.result is not None or (self.error is not None and self.error.committed)

    def reply(self) -> p.MigrationReply:
        """Its figures now; once ended, its outcome too."""
        prog = self.control.progress()
        result = self.result if self.error is None else self.error.result
        phase = prog.phase
        if self.ended:
            if self.result is not None:
                phase = "done"
            elif self.error is not None and self.error.committed:
                phase = "commit"
            else:
                phase = "cancelled" if self.cancelled else "failed"
        elif phase == "failed":
            phase = "stopcopy"  # rolling back: it ends in a moment
        return p.MigrationReply(
            phase=phase,
            ended=self.ended,
            committed=self.committed,
            iteration=prog.iteration,
            bytes_sent=prog.bytes_sent if result is None else max(result.bytes_sent, 0),
            remaining_bytes=prog.remaining_bytes,
            memory_bytes=self.memory_bytes,
            dirty_rate=prog.dirty_rate,
            bandwidth=prog.bandwidth,
            predicted_ms=prog.predicted_ms,
            budget_ms=prog.budget_ms,
            throttle_pct=prog.throttle_pct,
            elapsed_ms=(time.monotonic() - self.started) * 1000,
            downtime_ms=None if self.result is None else self.result.downtime_ms,
            paused_ms=None if self.result is None else self.result.paused_ms,
            source_paused=result is not None and result.source_paused,
            error=None if self.error is None else self.error.message,
        )


class Incoming:
    """Waits for the source on a thread; `machine` is the migrated machine once it runs."""

    def __init__(self, cfg: IncomingConfig, wake: socket.socket) -> None:
        self.cfg = cfg
        self.listener = MigrationListener(cfg.token, host=cfg.address, port=cfg.port)
        self.port = int(self.listener.address[1])
        self.control = Migration()
        self.machine: Machine | None = None
        self.error: str | None = None
        self.cancelled = False
        self.ended = False
        self._stop = threading.Event()
        self._wake = wake
        self._thread: threading.Thread | None = None

    def start(
        self,
        *,
        console_out: int,
        console_in: int,
        disks: list[Disk],
        nics: list[Nic],
        memory_mib: int,
        vcpus: int,
    ) -> None:
        def run() -> None:
            try:
                self.machine, _ = self.listener.accept(
                    console_out=console_out,
                    console_in=console_in,
                    disks=disks,
                    nics=nics,
                    memory_mib=memory_mib,
                    vcpus=vcpus,
                    timeout=self.cfg.timeout_s,
                    control=self.control,
                    paused=self.cfg.paused,
                    copy_disks=list(self.cfg.copy_disks),
                )
            except MigrationError as exc:
                self.error = exc.message
            except OSError as exc:  # the listener closed by cancel()
                self.error = f"the listener closed: {exc}"
            except Exception as exc:
                self.error = f"incoming migration: {exc!r}"
            finally:
                self.ended = True
                try:
                    self._wake.send(b"i")
                except OSError:
                    pass
            if self.machine is not None:
                # The token is spent: refuse replays of it while this VMM lives.
                self.listener.refuse_replays(self._stop)

        self._thread = threading.Thread(target=run, name="migrate-in", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stops waiting (a stream under way is aborted unless it committed); joins."""
        self.cancelled = True
        self.control.cancel()
        self.listener.close()  # wakes an accept() still waiting for the source to come
        if self._thread is not None:
            while not self.ended:
                time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
