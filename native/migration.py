"""Live pre-copy migration of a `Machine` to another process over TCP (docs/migration.md).

The source calls `migrate(machine, address, token)`: the guest's RAM streams while it runs,
pages it dirties are sent again until the predicted pause fits the budget (the vCPUs are
throttled when it does not converge), then the machine pauses, the last pages and its state
go over, and once the target has loaded everything the source commits and the target runs
the guest. Any failure before the commit (connection loss, target death, cancel, timeout,
refusal) resumes the source: exactly one copy runs. The target holds a `MigrationListener`
with a one-time token (or runs `python -m native.migration listen`).

Like native.machine, this imports only the standard library and the cffi module.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

from native.machine import Disk, Machine, Nic, VmmError, _Devices, _text, _vmm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NamedTuple
else:
    from native.machine import NamedTuple  # typing-free records (see native.machine)

TOKEN_BYTES = 32
DEBUG = 1
NO_THROTTLE = 2
STREAM_V1 = 4
# The stream versions this VMM speaks (native/migrate.h): a target says its newest
# (IncomingEndpoint.stream_version), and a source speaks that one to it.
STREAM_VERSION = 2
STREAM_VERSION_MIN = 1
DISK_COPY = 2  # FL_DISK_COPY
MAX_DISKS = 4
_PHASES = {1: "setup", 2: "precopy", 3: "stopcopy", 4: "commit", 5: "done", 6: "failed"}


class MigrationError(VmmError):
    """A migration failed. `committed` False (every failure before the commit): the source
    runs on as before and the target has discarded what it got. `committed` True: the commit
    was sent but the target never confirmed it; the source stays paused (never resumed on its
    own: the target may be running the guest) until someone who knows the target's fate
    decides. `refused`: the target refused the stream (token, version, machine config)."""

    def __init__(
        self,
        message: str,
        err: int = errno.EIO,
        *,
        committed: bool = False,
        refused: bool = False,
        result: MigrationResult | None = None,
    ) -> None:
        super().__init__(message, err)
        self.committed = committed
        self.refused = refused
        self.result = result


class MigrationProgress(NamedTuple):
    """A migration's progress. `phase`: setup, precopy, stopcopy (source paused), commit,
    done, failed. `remaining_bytes`: dirty at the last collection; `dirty_rate` and
    `bandwidth` in bytes/s (bandwidth without the cap's waits); `predicted_ms`: the pause the
    last check predicted; `throttle_pct`: the share of each 10 ms the vCPUs sleep.
    Copied disks (a block copy): `disk_bytes_sent` of them so far (in `bytes_sent` too),
    `disk_remaining_bytes` written since they were last sent (in `remaining_bytes` too)."""

    phase: str
    iteration: int
    bytes_sent: int
    pages_sent: int
    zero_pages: int
    remaining_bytes: int
    dirty_rate: int
    bandwidth: int
    predicted_ms: float
    budget_ms: float
    throttle_pct: int
    elapsed_ms: float
    disk_bytes_sent: int = 0
    disk_remaining_bytes: int = 0


class MigrationResult(NamedTuple):
    """What a migration did. `downtime_ms`: the pause as the target measured it (from the
    source's last-bytes marker arriving to its vCPUs running); `paused_ms`: from the source's
    pause to the target's resume, comparable only when both run on one host (one clock);
    `ram_checksum`: in debug mode, the checksum of all RAM both sides agreed on;
    `source_paused`: the source reached its paused phase, the last pages and the state (a
    failure after that resumed a machine that had been running). `disk_bytes`,
    `disk_chunks`: what the block copy sent (the target: received) of the copied disks, in
    64 KiB chunks (a chunk the guest wrote again is sent and counted again)."""

    downtime_ms: float
    paused_ms: float
    total_ms: float
    bytes_sent: int
    pages_sent: int
    zero_pages: int
    final_pages: int
    state_bytes: int
    iterations: int
    throttle_pct: int
    load_ms: float
    ram_checksum: str
    source_paused: bool = False
    disk_bytes: int = 0
    disk_chunks: int = 0


def new_token() -> str:
    """A fresh one-time token (hex) for one migration."""
    return os.urandom(TOKEN_BYTES).hex()


def _token_bytes(token: str) -> bytes:
    try:
        raw = bytes.fromhex(token)
    except ValueError:
        raw = b""
    if len(raw) != TOKEN_BYTES:
        raise ValueError(f"a migration token is {TOKEN_BYTES * 2} hex digits")
    return raw


def _result(res: Any) -> MigrationResult:
    paused = 0.0
    if res.target_resume_ns and res.source_pause_ns:
        paused = (int(res.target_resume_ns) - int(res.source_pause_ns)) / 1e6
    return MigrationResult(
        downtime_ms=res.downtime_ns / 1e6,
        paused_ms=paused,
        total_ms=res.total_ns / 1e6,
        bytes_sent=int(res.bytes_sent),
        pages_sent=int(res.pages_sent),
        zero_pages=int(res.zero_pages),
        final_pages=int(res.final_pages),
        state_bytes=int(res.state_bytes),
        iterations=int(res.iterations),
        throttle_pct=int(res.throttle_pct),
        load_ms=res.load_ns / 1e6,
        ram_checksum=f"{int(res.ram_sum):016x}" if res.ram_sum else "",
        source_paused=bool(res.source_pause_ns),
        disk_bytes=int(res.disk_bytes),
        disk_chunks=int(res.disk_chunks),
    )


def _disk_mask(copy_disks: Sequence[int]) -> int:
    mask = 0
    for index in copy_disks:
        if not 0 <= index < MAX_DISKS:
            raise ValueError(f"copy_disks: no disk {index} (a machine has at most {MAX_DISKS})")
        mask |= 1 << index
    return mask


class Migration:
    """Steers one migration from any thread while it runs: the pause budget, the bandwidth
    cap, cancel; and reports its progress. Reusable for one migration at a time."""

    def __init__(self, *, max_downtime_ms: float = 300.0, bandwidth: int = 0) -> None:
        mod = _vmm()
        self._ffi = mod.ffi
        self._lib = mod.lib
        handle = self._lib.fl_migration_new()
        if handle == self._ffi.NULL:
            raise VmmError("out of memory", errno.ENOMEM)
        self._m: Any = self._ffi.gc(handle, self._lib.fl_migration_free)
        self.set_max_downtime(max_downtime_ms)
        self.set_bandwidth(bandwidth)

    def set_max_downtime(self, ms: float) -> None:
        """The longest pause allowed; takes effect at the next iteration's check."""
        if ms <= 0:
            raise ValueError("the downtime budget must be positive")
        self._lib.fl_migration_set_budget(self._m, int(ms * 1e6))

    def set_bandwidth(self, bytes_per_s: int) -> None:
        """Caps the pre-copy's sending rate (0: no cap); the paused phase is never capped."""
        if bytes_per_s < 0:
            raise ValueError("bandwidth must be >= 0")
        self._lib.fl_migration_set_bandwidth(self._m, int(bytes_per_s))

    def cancel(self) -> None:
        """Stops the migration if it has not committed; the source runs on."""
        self._lib.fl_migration_cancel(self._m)

    def progress(self) -> MigrationProgress:
        p = self._ffi.new("struct fl_migrate_progress *")
        self._lib.fl_migration_progress(self._m, p)
        return MigrationProgress(
            phase=_PHASES.get(int(p.phase), "setup"),
            iteration=int(p.iteration),
            bytes_sent=int(p.bytes_sent),
            pages_sent=int(p.pages_sent),
            zero_pages=int(p.zero_pages),
            remaining_bytes=int(p.remaining_bytes),
            dirty_rate=int(p.dirty_rate),
            bandwidth=int(p.bandwidth),
            predicted_ms=p.predicted_ns / 1e6,
            budget_ms=p.budget_ns / 1e6,
            throttle_pct=int(p.throttle_pct),
            elapsed_ms=p.elapsed_ns / 1e6,
            disk_bytes_sent=int(p.disk_bytes_sent),
            disk_remaining_bytes=int(p.disk_remaining_bytes),
        )

    def _error(self) -> str:
        return _text(self._ffi, self._lib.fl_migration_error(self._m))


def migrate(
    machine: Machine,
    address: tuple[str, int],
    token: str,
    *,
    control: Migration | None = None,
    max_downtime_ms: float = 300.0,
    bandwidth: int = 0,
    timeout: float = 60.0,
    debug: bool = False,
    auto_converge: bool = True,
    progress: Callable[[MigrationProgress], None] | None = None,
    progress_interval: float = 0.25,
    copy_disks: Sequence[int] = (),
    stream_version: int = STREAM_VERSION,
) -> MigrationResult:
    """Migrates running (or paused) `machine` live to the listener at `address` that holds
    `token`.

    Returns once the target runs the guest; `machine` is then PAUSED and never resumed by
    this module (close it). A paused machine streams in one pass and stays paused whatever
    happens (the target still runs the guest on the commit). `control` (else one made from
    max_downtime_ms and bandwidth) steers it from other threads. `progress` is called on this
    thread at most every `progress_interval` seconds, and once more at the end. `debug`
    checks a checksum of every page on arrival and of all RAM before the commit;
    `auto_converge` False never throttles the vCPUs. `copy_disks`: the indices of the disks
    whose contents go through the stream (a live block copy, for storage the target's host
    does not share; the target must be given the same ones to copy, each the same size);
    the others are shared. `stream_version`: the stream's version, the target's newest (1
    for a target of an older release, which knows no block copy: refused with
    `copy_disks`). Raises MigrationError (see its `committed`), ValueError for a malformed
    token, a disk index out of range or a version this VMM does not speak.
    """
    if not STREAM_VERSION_MIN <= stream_version <= STREAM_VERSION:
        raise ValueError(
            f"migration stream version {stream_version}: this VMM speaks versions "
            f"{STREAM_VERSION_MIN} to {STREAM_VERSION}"
        )
    raw = _token_bytes(token)
    mask = _disk_mask(copy_disks)
    ctl = (
        control
        if control is not None
        else Migration(max_downtime_ms=max_downtime_ms, bandwidth=bandwidth)
    )
    mod = _vmm()
    mod.lib.fl_migration_set_copy_disks(ctl._m, mask)
    res = mod.ffi.new("struct fl_migrate_result *")
    try:
        sock = socket.create_connection(address, timeout=min(timeout, 10.0))
    except OSError as exc:
        raise MigrationError(f"cannot reach the target {address}: {exc}", exc.errno or 0) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    rc: list[int] = []
    vm = machine._handle()
    flags = (DEBUG if debug else 0) | (0 if auto_converge else NO_THROTTLE)
    flags |= STREAM_V1 if stream_version < 2 else 0

    def run() -> None:
        rc.append(
            int(
                mod.lib.fl_migrate_send(
                    vm, ctl._m, sock.fileno(), raw, flags, int(timeout * 1e9), res
                )
            )
        )

    worker = threading.Thread(target=run, name="migrate-send", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(progress_interval)
            if progress is not None:
                progress(ctl.progress())
    finally:
        worker.join()
        sock.close()
    result = _result(res)
    if rc[0] < 0:
        message = ctl._error()
        raise MigrationError(
            message,
            -rc[0],
            committed=bool(res.committed),
            refused=-rc[0] == errno.EREMOTEIO,
            result=result,
        )
    return result


class MigrationListener:
    """The target's end: a TCP listener for one migration with a one-time token.

    `accept()` receives one migration into a new machine. A connection that does not
    present the token (another stream, another version, a wrong token) is refused with the
    reason and the listener waits on; the first connection that presents it spends it, and
    every later one is refused as a replay (`refuse_replays`). Close it when done.
    """

    def __init__(self, token: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._token = _token_bytes(token)
        self._sock = socket.create_server((host, port))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self.spent = False
        self.refused: list[str] = []

    def close(self) -> None:
        """Closes the listener; a thread waiting in `accept` or `refuse_replays` wakes
        (the shutdown does that on Linux; a close alone would leave it waiting)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already, or never listened
        self._sock.close()

    def __enter__(self) -> MigrationListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        mod = _vmm()
        mod.lib.fl_migrate_refuse(conn.fileno(), why.encode())
        self.refused.append(why)

    def refuse_replays(self, stop: threading.Event) -> None:
        """Refuses every connection (the token is spent) until `stop` is set."""
        self._sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._refuse(conn, "this migration's token was already used")

    def accept(
        self,
        *,
        console_out: int | None = None,
        console_in: int | None = None,
        disks: Sequence[Disk] = (),
        nics: Sequence[Nic] = (),
        memory_mib: int = 0,
        vcpus: int = 0,
        timeout: float = 60.0,
        control: Migration | None = None,
        paused: bool = False,
        copy_disks: Sequence[int] = (),
    ) -> tuple[Machine, MigrationResult]:
        """Waits up to `timeout` s for the source to come and the migration to finish, and
        returns the machine, RUNNING, and what the target measured (`paused`: the machine
        has its state loaded but never ran here; `start()` runs it). `disks`/`nics` as for
        `Machine.restore`; `memory_mib`/`vcpus`: what the guest must have (0: whatever the
        source says), a source with another machine is refused. `copy_disks`: the indices
        of `disks` the source copies into (as its `migrate(copy_disks=...)`; each must be
        writable and the size of the source's): each is emptied (hole-punched) once the
        source is accepted and then receives the source's data. A failed or cancelled
        migration leaves such a file partly written: it is the caller's to delete. Raises
        MigrationError (nothing is left running) when the token was spent, when the stream
        failed after the token, or on the timeout; ValueError for a disk index out of
        range."""
        mask = _disk_mask(copy_disks)
        if mask >> len(disks):
            raise ValueError(f"copy_disks: {list(copy_disks)} for {len(disks)} disks")
        ctl = control if control is not None else Migration()
        deadline = time.monotonic() + timeout
        mod = _vmm()
        ffi = mod.ffi
        mod.lib.fl_migration_set_start_paused(ctl._m, 1 if paused else 0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError("no source presented the token in time", errno.ETIMEDOUT)
            self._sock.settimeout(left)
            try:
                conn, _ = self._sock.accept()
            except TimeoutError as exc:
                raise MigrationError(
                    "no source presented the token in time", errno.ETIMEDOUT
                ) from exc
            with conn:
                if self.spent:
                    self._refuse(conn, "this migration's token was already used")
                    continue
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                devices = _Devices(ffi, disks, nics, random_macs=False)
                for i in range(len(disks)):
                    if mask >> i & 1:
                        devices.disks_c[i].flags |= DISK_COPY
                cfg = devices.config(
                    console_out_fd=-1 if console_out is None else console_out,
                    console_in_fd=-1 if console_in is None else console_in,
                    memory_mib=memory_mib,
                    vcpus=vcpus,
                )
                machine = Machine.__new__(Machine)
                machine._ffi = ffi
                machine._lib = mod.lib
                machine._vm = machine._new_handle()
                res = ffi.new("struct fl_migrate_result *")
                rc = mod.lib.fl_migrate_receive(
                    machine._vm,
                    ctl._m,
                    cfg,
                    conn.fileno(),
                    self._token,
                    int(max(left, 0.001) * 1e9),
                    res,
                )
            if res.token_accepted:
                self.spent = True
            if rc < 0:
                machine.close()
                why = ctl._error()
                if not res.token_accepted:
                    self.refused.append(why)
                    continue
                raise MigrationError(why, -rc, result=_result(res))
            machine.vcpus = int(res.vcpus)
            machine.memory_mib = int(res.memory_mib)
            machine.macs = [bytes(res.macs[i]).hex(":") for i in range(len(nics))]
            return machine, _result(res)


def _print(obj: dict[str, object]) -> None:
    import json  # noqa: PLC0415 - the CLI only

    os.write(1, (json.dumps(obj) + "\n").encode())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m native.migration listen`: a target process. Prints JSON lines on stdout
    (`listening` with the port, then `resumed` with the result, or `failed`), runs the
    migrated guest (its console on --console-fd) until it ends or SIGTERM, refusing replays
    of the token meanwhile. The token comes from FLOTILLA_MIGRATION_TOKEN (not argv, which
    other users can read) or --token."""
    import argparse  # noqa: PLC0415
    import signal  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m native.migration")
    sub = parser.add_subparsers(dest="command", required=True)
    listen = sub.add_parser("listen", help="receive one migration and run the guest")
    listen.add_argument("--host", default="127.0.0.1")
    listen.add_argument("--port", type=int, default=0)
    listen.add_argument("--token", default=os.environ.get("FLOTILLA_MIGRATION_TOKEN", ""))
    listen.add_argument("--timeout", type=float, default=60.0)
    listen.add_argument("--console-fd", type=int, default=2)
    listen.add_argument("--memory-mib", type=int, default=0, help="refuse another size")
    listen.add_argument("--vcpus", type=int, default=0, help="refuse another count")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        listener = MigrationListener(args.token, host=args.host, port=args.port)
    except (ValueError, OSError) as exc:
        _print({"event": "failed", "error": str(exc)})
        return 2
    with listener:
        _print({"event": "listening", "host": listener.address[0], "port": listener.address[1]})
        try:
            machine, result = listener.accept(
                console_out=args.console_fd,
                memory_mib=args.memory_mib,
                vcpus=args.vcpus,
                timeout=args.timeout,
            )
        except MigrationError as exc:
            _print({"event": "failed", "error": exc.message, "refused": listener.refused})
            return 1
        _print({"event": "resumed", "refused": listener.refused, **result._asdict()})
        replays = threading.Thread(target=listener.refuse_replays, args=(stop,), daemon=True)
        replays.start()
        with machine:
            while not stop.is_set():
                event = machine.wait_event(0.2)
                if event is not None and event.kind.name != "CRASHED":
                    _print({"event": "stopped", "reason": event.reason})
                    break
        stop.set()
        replays.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
