"""Boot a guest with its console on this terminal: our `qemu -kernel`.

    python -m native.run --kernel guest.elf --cmdline "ready echo" --memory 64 --vcpus 2

The exit status tells how the guest ended: POWEROFF through ACPI 0, through the debug-exit
port its status `(v << 1) | 1` (odd, as QEMU's isa-debug-exit), REBOOT 2, CRASHED (pvpanic) 4,
INTERNAL_ERROR 6, stopped from the host (Ctrl-] on a terminal, SIGINT, SIGTERM) 130, a bad
command line or configuration 64.

Options: --kernel PATH (PVH ELF, bzImage or vmlinux; required), --initrd PATH, --cmdline TEXT,
--memory MiB (default 128), --vcpus N (default 1), --memfd (back guest RAM with a memfd),
--disk PATH[,ro] (a virtio-blk disk on a raw image; repeatable), --tap NAME (a virtio-net NIC
on tap interface NAME, opened or created here but configured by the caller; repeatable),
--restore DIR (run on from a snapshot that `Machine.save` wrote to DIR instead of booting a
kernel: --kernel, --initrd, --cmdline, --memory and --vcpus do not apply; give the same
--disk/--tap devices as when it was saved).

SIGUSR1 prints where the guest stands to stderr, as QEMU's monitor would: every vCPU (run
state, rip, local APIC: pending and in-service vectors, timer) and the IOAPIC, UART and virtio
queues (Machine.describe_vcpus, Machine.describe_devices); the guest runs on.
"""

from __future__ import annotations

import os
import sys
import time

if sys.flags.no_site:
    # `python -S -E -m native.run` starts ~20 ms sooner; cffi's backend is all it needs from
    # site-packages, so add just that directory (no .pth processing).
    _version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    sys.path.append(os.path.join(sys.prefix, "lib", _version, "site-packages"))  # noqa: PTH118

from native.machine import (
    TYPE_CHECKING,
    Disk,
    Event,
    EventKind,
    Machine,
    Nic,
    VmmError,
    open_tap,
)

if TYPE_CHECKING:
    import signal
    from types import FrameType, TracebackType
    from typing import Any
else:
    # The C module: `signal` adds its enums (and the enum module, ~4 ms of this start).
    import _signal as signal

EXIT_REBOOT = 2
EXIT_CRASHED = 4
EXIT_INTERNAL_ERROR = 6
EXIT_STOPPED = 130
EXIT_USAGE = 64
ESCAPE = 0x1D  # Ctrl-]


def exit_status(event: Event) -> int:
    if event.kind is EventKind.POWEROFF:
        return event.code & 0xFF
    if event.kind is EventKind.REBOOT:
        return EXIT_REBOOT
    if event.kind is EventKind.CRASHED:
        return EXIT_CRASHED
    return EXIT_INTERNAL_ERROR


class Flag:
    """Set from a signal handler or the input thread, polled by the main loop."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False


def dump(machine: Machine) -> str:
    """Every vCPU (paused for a moment to read them) and the devices' interrupt state."""
    try:
        return machine.describe()
    except VmmError as exc:
        return f"cannot pause it: {exc}\n" + machine.describe_devices().rstrip("\n")


class UsageError(Exception):
    pass


class Args:
    """The command line; parsed by hand because argparse (with re, gettext, shutil) costs
    ~5 ms of a VMM's ~25 ms start-to-exit."""

    def __init__(self, argv: list[str]) -> None:
        self.kernel = ""
        self.initrd: str | None = None
        self.cmdline = ""
        self.memory = 128
        self.vcpus = 1
        self.memfd = False
        self.disks: list[Disk] = []
        self.taps: list[str] = []
        self.restore = ""
        rest = list(argv)
        while rest:
            arg = rest.pop(0)
            name, eq, value = arg.partition("=")
            if name == "--memfd" and not eq:
                self.memfd = True
                continue
            if name not in (
                "--kernel",
                "--initrd",
                "--cmdline",
                "--memory",
                "--vcpus",
                "--disk",
                "--tap",
                "--restore",
            ):
                raise UsageError(f"unknown argument {arg!r}")
            if not eq:
                if not rest:
                    raise UsageError(f"{name} needs a value")
                value = rest.pop(0)
            self._take(name, value)
        if self.restore and self.kernel:
            raise UsageError("--restore and --kernel exclude each other")
        if not self.kernel and not self.restore:
            raise UsageError("--kernel (or --restore) is required")

    def _take(self, name: str, value: str) -> None:
        if name == "--disk":
            path, _, mode = value.partition(",")
            if not path or mode not in ("", "ro"):
                raise UsageError(f"--disk takes PATH or PATH,ro, not {value!r}")
            self.disks.append(Disk(path, read_only=mode == "ro"))
        elif name == "--tap":
            if not value:
                raise UsageError("--tap needs an interface name")
            self.taps.append(value)
        elif name in ("--memory", "--vcpus"):
            try:
                setattr(self, name[2:], int(value))
            except ValueError:
                raise UsageError(f"{name} takes an integer, not {value!r}") from None
        else:
            setattr(self, name[2:], value)


class RawTerminal:
    """The terminal on `fd` in raw mode for the block (none of it unless `on`); a class, not
    contextlib's decorator, whose import costs this start ~1 ms."""

    def __init__(self, fd: int, on: bool) -> None:
        self.fd = fd
        self.on = on
        self.saved: list[Any] | None = None

    def __enter__(self) -> None:
        if not self.on:
            return
        import termios  # noqa: PLC0415 - only a terminal session needs these
        import tty  # noqa: PLC0415

        self.saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd)

    def __exit__(
        self,
        _kind: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self.saved is not None:
            import termios  # noqa: PLC0415

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


class InputRelay:
    """Copies terminal input to the guest; Ctrl-] ends the session."""

    def __init__(self, stop: Flag) -> None:
        import threading  # noqa: PLC0415 - only a terminal session needs a thread

        self.read_fd, self._write_fd = os.pipe()
        self._stop = stop
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            data = os.read(0, 1024)
            if not data:
                return
            if ESCAPE in data:
                os.write(self._write_fd, data[: data.index(ESCAPE)])
                self._stop.set()
                return
            os.write(self._write_fd, data)


def parse_args(argv: list[str] | None) -> Args:
    return Args(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"native.run: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    stop = Flag()
    interactive = os.isatty(0)
    relay = InputRelay(stop) if interactive else None

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    dump_asked = Flag()

    def on_dump(_signum: int, _frame: FrameType | None) -> None:
        dump_asked.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_dump)
    tap_fds: list[int] = []
    try:
        for name in args.taps:
            fd = open_tap(name, vnet_hdr=True)  # the offloads (native/virtio/net.c)
            tap_fds.append(fd)
        console_in = relay.read_fd if relay else 0
        if args.restore:
            machine = Machine.restore(
                args.restore,
                console_out=1,
                console_in=console_in,
                disks=args.disks,
                nics=[Nic(fd) for fd in tap_fds],
            )
        else:
            machine = Machine(
                args.kernel,
                initrd=args.initrd,
                cmdline=args.cmdline,
                memory_mib=args.memory,
                vcpus=args.vcpus,
                console_out=1,
                console_in=console_in,
                memfd=args.memfd,
                disks=args.disks,
                nics=[Nic(fd) for fd in tap_fds],
            )
    except (VmmError, OSError) as exc:
        print(f"native.run: {exc}", file=sys.stderr)
        for fd in tap_fds:
            os.close(fd)
        return EXIT_USAGE
    status = EXIT_STOPPED
    with machine, RawTerminal(0, interactive):
        machine.start()
        running = since_process_start()
        while not stop.is_set():
            if dump_asked.is_set():
                dump_asked.clear()
                print(f"\nnative.run: where the guest stands\n{dump(machine)}", file=sys.stderr)
            event = machine.wait_event(0.2)
            if event is None:
                continue
            status = exit_status(event)
            summary = f"{event.kind.name} ({event.reason}"
            summary += f", code {event.code})" if event.code else ")"
            break
        else:
            summary = "stopped from the host"
        machine.stop()
    print(
        f"\nnative.run: {summary}; vCPUs running {running:.3f} s after the start, stopped at "
        f"{since_process_start():.3f} s",
        file=sys.stderr,
    )
    return status


def since_process_start() -> float:
    """Seconds since this process began (the interpreter's start included), from its start
    time in /proc (clock ticks since boot) and CLOCK_BOOTTIME: 10 ms resolution."""
    with open("/proc/self/stat", "rb") as f:  # noqa: PTH123 (pathlib: ~3 ms import)
        fields = f.read().rsplit(b")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


if __name__ == "__main__":
    code = main()
    # The machine is closed; skip interpreter teardown (a few ms of a VMM's start-to-exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
