"""Boot a guest with its console on this terminal: our `qemu -kernel`.

    python -m native.run --kernel guest.elf --cmdline "ready echo" --memory 64 --vcpus 2

The exit status tells how the guest ended: POWEROFF through ACPI 0, through the debug-exit
port its status `(v << 1) | 1` (odd, as QEMU's isa-debug-exit), REBOOT 2, CRASHED (pvpanic) 4,
INTERNAL_ERROR 6, stopped from the host (Ctrl-] on a terminal, SIGINT, SIGTERM) 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

if sys.flags.no_site:
    # `python -S -E -m native.run` starts ~20 ms sooner; cffi's backend is all it needs from
    # site-packages, so add just that directory (no .pth processing).
    _version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    sys.path.append(os.path.join(sys.prefix, "lib", _version, "site-packages"))  # noqa: PTH118

from native.machine import Event, EventKind, Machine, VmmError

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


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class InputRelay:
    """Copies terminal input to the guest; Ctrl-] ends the session."""

    def __init__(self, stop: threading.Event) -> None:
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m native.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kernel", required=True, help="PVH ELF, bzImage or vmlinux")
    p.add_argument("--initrd")
    p.add_argument("--cmdline", default="")
    p.add_argument("--memory", type=int, default=128, help="MiB (default 128)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--memfd", action="store_true", help="back guest RAM with a memfd")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    interactive = os.isatty(0)
    relay = InputRelay(stop) if interactive else None

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        machine = Machine(
            args.kernel,
            initrd=args.initrd,
            cmdline=args.cmdline,
            memory_mib=args.memory,
            vcpus=args.vcpus,
            console_out=1,
            console_in=relay.read_fd if relay else 0,
            memfd=args.memfd,
        )
    except VmmError as exc:
        print(f"native.run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    status = EXIT_STOPPED
    with machine, raw_terminal(0) if interactive else contextlib.nullcontext():
        machine.start()
        while not stop.is_set():
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
    print(f"\nnative.run: {summary}", file=sys.stderr)
    return status


if __name__ == "__main__":
    code = main()
    # The machine is closed; skip interpreter teardown (a few ms of a VMM's start-to-exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
