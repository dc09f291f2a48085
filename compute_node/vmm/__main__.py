"""`python -m compute_node.vmm <domain-dir>`: the process that runs one guest (docs/vmm.md).

It owns the guest's `native.Machine`, applies the domain's on_poweroff/on_reboot/on_crash
policies itself (so a guest is handled correctly while no worker is connected), journals every
lifecycle change to `<domain-dir>/journal` before telling anyone, and answers control requests
on `<domain-dir>/control.sock`. Here: the pid lock, the launch config, the cgroup and the
socket; the rest is `loop`, `operations` and `guest`.

Imports only the standard library, msgpack and `native`: it starts once per guest start.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import socket
import sys

if sys.flags.no_site:
    # spawn() runs us under `python -S -E` (~20 ms sooner): add only the site-packages that
    # hold msgpack and cffi's backend, the venv's when run from one (no .pth processing).
    _ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for _root in (os.path.dirname(os.path.dirname(sys.executable)), sys.prefix):  # noqa: PTH120
        _dir = os.path.join(_root, "lib", _ver, "site-packages")  # noqa: PTH118
        if os.path.isdir(_dir) and _dir not in sys.path:  # noqa: PTH112
            sys.path.append(_dir)
    try:
        import msgpack  # noqa: F401
    except ImportError:  # an interpreter laid out otherwise: pay for the full site set-up
        import site

        site.main()

from compute_node.vmm.config import ConfigInvalid, join_cgroup, load_config
from compute_node.vmm.frames import CONFIG_FILE, CONTROL_SOCKET, JOURNAL, PID_FILE, Journal
from compute_node.vmm.loop import Loop
from compute_node.vmm.spare import wait_for_assignment
from native.machine import ConfigError, SnapshotError, VmmError

EXIT_FAILED = 1
EXIT_USAGE = 64


def _unlink(path: str) -> None:
    try:
        os.unlink(path)  # noqa: PTH108 (pathlib costs the VMM import time)
    except OSError:
        pass


def _bind_control_socket() -> socket.socket:
    _unlink(CONTROL_SOCKET)  # a stale socket of a dead VMM (the pid lock says none runs)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # born 0600: no window with a wider mode
    try:
        sock.bind(CONTROL_SOCKET)
    finally:
        os.umask(old)
    os.chmod(CONTROL_SOCKET, 0o600)  # noqa: PTH101
    sock.listen(16)
    return sock


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m compute_node.vmm <domain-dir>", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Relative names from here on: a control socket path may not exceed 107 bytes.
        os.chdir(argv[0])
        pid_fd = os.open(PID_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        print(f"compute_node.vmm: {argv[0]}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        # Held for the process's life: one VMM per domain dir.
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"compute_node.vmm: another VMM runs in {argv[0]}", file=sys.stderr)
        return EXIT_FAILED
    os.ftruncate(pid_fd, 0)
    os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
    journal = Journal(JOURNAL)
    try:
        config = load_config(CONFIG_FILE)
    except ConfigInvalid as exc:
        journal.append("failed", str(exc))
        _unlink(PID_FILE)
        return EXIT_FAILED
    cgroup, cgroup_error = None, None
    if config.cgroup is not None:
        cgroup, cgroup_error = join_cgroup(config.domain_id, config.cgroup)
    listener = _bind_control_socket()
    loop = Loop(config, journal, listener, cgroup, cgroup_error)
    try:
        loop.boot()
    except VmmError as exc:
        _unlink(CONTROL_SOCKET)
        loop.guest.end_machine()
        journal.append("failed", exc.message, _failure_code(exc))
        _unlink(PID_FILE)
        return EXIT_FAILED
    return loop.run()


def spare_main(argv: list[str]) -> int:
    """`--spare <fd> <pid-file>`: a warm VMM (compute_node/vmm/spare.py): everything a VMM
    imports loaded, it waits for its domain dir and then is that domain's VMM."""
    try:
        fd, pid_file = int(argv[0]), argv[1]
    except (IndexError, ValueError):
        print("usage: python -m compute_node.vmm --spare <fd> <pid-file>", file=sys.stderr)
        return EXIT_USAGE
    try:
        importlib.import_module("native._vmm")  # a cold VMM loads it at its first machine
    except ImportError:
        pass  # not built: the machine will say so, as a cold VMM's does
    directory = wait_for_assignment(fd, pid_file)
    if directory is None:
        return 0
    return main([directory])


def _failure_code(exc: VmmError) -> str:
    # A kernel or initrd that is no bootable image, or a saved state that is missing, damaged,
    # newer or of another machine, is the request's fault, the same on any host: `invalid`
    # tells the worker not to try elsewhere. A disk another writer holds locked is
    # `conflict`: the same volume is locked on any host too.
    if isinstance(exc, SnapshotError):
        return "invalid"
    if isinstance(exc, ConfigError):
        return "conflict" if exc.errno == errno.EBUSY else "invalid"
    return ""


if __name__ == "__main__":
    spare = sys.argv[1:2] == ["--spare"]
    status = spare_main(sys.argv[2:]) if spare else main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed; skip interpreter teardown (it only costs exit time).
    os._exit(status)
