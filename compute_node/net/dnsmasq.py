"""One dnsmasq per network per host: DHCP with static entries only, bound to the bridge.

dnsmasq drops to an unprivileged user and re-reads its hosts file as that user on SIGHUP, so
the files it reads live where any user can reach them, whatever the state dir's mode (as
libvirt keeps its own under /var/lib/libvirt/dnsmasq): in a run dir,
`<net_dnsmasq_dir>/<host>-<8 hex of the state dir>/` (`node_dir`, default under
/run/flotilla/dnsmasq), made 0755, files 0644, named by the network's short id:
`<id>.hosts` (one `MAC,IP` line per port, the only addresses handed out), `<id>.pid` and
`<id>.argv` (the command line it was started with). Its log, which it opens as root before
dropping privileges, stays in the state dir: `<state_dir>/dnsmasq/<id>.log`. Stopping a
network's dnsmasq removes its files, and the run dir once it is empty.

Plugging or unplugging a port rewrites the hosts file and sends SIGHUP (dnsmasq re-reads
it); dnsmasq is restarted only when its command line would change. DNS answers names of this
network's hosts only: nothing is forwarded outside.

Earlier versions kept `.hosts`, `.pid` and `.argv` beside the log in the state dir: a pid
file found there is honoured once, so a node upgraded in place finds its running dnsmasqs
(their command line names the old files, so `ensure` restarts them under the run dir and
`stop` ends them) and the old files are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from compute_node.net import netns
from compute_node.net.models import NetworkMode, NetworkPlumbing, PortPlumbing

LEASE_TIME = "1h"
# Where each node's run dir is made unless configured otherwise (compute setting
# net_dnsmasq_dir): root's, on a tmpfs that is empty after a reboot, as dnsmasq is then too.
RUN_DIR = Path("/run/flotilla/dnsmasq")
RUN_FILES = ("hosts", "pid", "argv")
log = structlog.get_logger(__name__)


class DnsmasqError(RuntimeError):
    """dnsmasq refused to start; the message has its own words."""


def hosts_text(ports: Iterable[PortPlumbing]) -> str:
    return "".join(f"{p.mac},{p.ipv4}\n" for p in sorted(ports, key=lambda p: p.mac))


def argv(network: NetworkPlumbing, files: dict[str, Path]) -> list[str]:
    """dnsmasq's command line for `network` (nat or isolated, with a gateway)."""
    gw = network.gateway
    assert gw is not None  # models.NetworkPlumbing: nat and isolated networks have one
    router = f"option:router,{gw.ip}" if network.mode is NetworkMode.NAT else "option:router"
    return [
        "dnsmasq",
        "--conf-file=/dev/null",
        f"--pid-file={files['pid']}",
        f"--log-facility={files['log']}",
        f"--interface={network.bridge}",
        "--bind-interfaces",
        "--except-interface=lo",
        f"--dhcp-range={gw.network.network_address},static,{gw.netmask},{LEASE_TIME}",
        f"--dhcp-hostsfile={files['hosts']}",
        # Forced: sent whether or not the client asks for option 26 (busybox's udhcpc and
        # others do not ask, and would keep 1500 on a VXLAN network), as Neutron does.
        f"--dhcp-option-force=option:mtu,{network.mtu}",
        f"--dhcp-option={router}",
        f"--dhcp-option=option:dns-server,{gw.ip}",
        "--dhcp-authoritative",
        # A client that asks for Rapid Commit (RFC 4039: our guests, systemd-networkd) gets
        # its ACK in answer to the DISCOVER: one exchange instead of two. Safe with one
        # server on the segment, as every network here has.
        "--dhcp-rapid-commit",
        "--leasefile-ro",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--domain-needed",
        "--bogus-priv",
    ]


def node_dir(base: Path, host: str, state_dir: Path) -> Path:
    """A compute node's own run dir under `base`: its host name (to be read by a person) and
    a hash of its resolved state dir, so nodes sharing a machine never share files."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return base / f"{host}-{digest}"


def default_node_dir(state_dir: Path) -> Path:
    """The run dir of a plumber given no other: under RUN_DIR, named by the machine."""
    return node_dir(RUN_DIR, socket.gethostname().split(".")[0], state_dir)


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0", 1)[0].endswith(b"dnsmasq")


class Dnsmasq:
    """The dnsmasqs of one state dir (`state_dir/dnsmasq/` keeps their logs), with their
    hosts, pid and argv files in `run_dir` (default: `default_node_dir(state_dir)`).

    `background`: a start does not wait for dnsmasq to be up (it takes tens of ms, more
    on a loaded host) but goes on on a thread of its own, which logs a failure
    (`net.dnsmasq_failed`) rather than raising it; a hosts file rewritten meanwhile is
    reloaded once it is up. A compute node starts guests while their dnsmasq comes up."""

    def __init__(
        self,
        state_dir: Path,
        netns_name: str | None = None,
        *,
        run_dir: Path | None = None,
        background: bool = False,
    ) -> None:
        self._log_dir = state_dir / "dnsmasq"  # also where earlier versions kept every file
        self._dir = default_node_dir(state_dir) if run_dir is None else run_dir
        self._netns = netns_name
        self._background = background
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Thread] = {}
        self._reload: set[str] = set()

    @property
    def run_dir(self) -> Path:
        return self._dir

    def files(self, network_id_short: str) -> dict[str, Path]:
        """This network's files: hosts, pid and argv in the run dir, the log in the state dir."""
        found = {k: self._dir / f"{network_id_short}.{k}" for k in RUN_FILES}
        return found | {"log": self._log_dir / f"{network_id_short}.log"}

    def _legacy_files(self, short: str) -> dict[str, Path]:
        return {k: self._log_dir / f"{short}.{k}" for k in RUN_FILES}

    def _found(self, short: str) -> tuple[int, dict[str, Path]] | None:
        """This network's running dnsmasq and the files it was started with: the run dir's,
        or else the ones an earlier version left in the state dir."""
        for files in (self.files(short), self._legacy_files(short)):
            try:
                pid = int(files["pid"].read_text().strip())
            except (OSError, ValueError):
                continue
            if _alive(pid):
                return pid, files
        return None

    def pid(self, short: str) -> int | None:
        """The pid of this network's dnsmasq if it is running."""
        found = self._found(short)
        return None if found is None else found[0]

    def running(self) -> set[str]:
        """Short ids of the networks whose dnsmasq is running here."""
        shorts = {p.stem for d in (self._dir, self._log_dir) for p in d.glob("*.pid")}
        return {short for short in shorts if self.pid(short) is not None}

    def ensure(self, network: NetworkPlumbing, ports: Iterable[PortPlumbing]) -> str | None:
        """Make this network's dnsmasq serve exactly `ports`; says what it changed (None:
        nothing). Raises DnsmasqError when dnsmasq cannot start."""
        _make_dir(self._dir)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        short = network.short_id
        files = self.files(short)
        hosts = hosts_text(ports)
        hosts_changed = _write_if_changed(files["hosts"], hosts)
        with self._lock:
            if short in self._starting:  # it reads the file once up, or is told to
                if hosts_changed:
                    self._reload.add(short)
                return None
        cmd = argv(network, files)
        found = self._found(short)
        pid = None if found is None else found[0]
        same = found is not None and _read(found[1]["argv"]) == json.dumps(cmd)
        if same and pid is not None:
            if hosts_changed:
                os.kill(pid, signal.SIGHUP)
                return "dnsmasq reloaded"
            return None
        if pid is not None:
            self._kill(pid)
        for path in self._legacy_files(short).values():
            path.unlink(missing_ok=True)
        change = "dnsmasq restarted" if pid is not None else "dnsmasq started"
        if not self._background:
            self._start(network.bridge, short, cmd)
            return change
        thread = threading.Thread(
            target=self._start_logged, args=(network.bridge, short, cmd), daemon=True
        )
        with self._lock:
            self._starting[short] = thread
        thread.start()
        return change

    def settle(self) -> None:
        """Wait for the starts under way (background mode)."""
        with self._lock:
            threads = list(self._starting.values())
        for thread in threads:
            thread.join()

    def _start(self, bridge: str, short: str, cmd: list[str]) -> None:
        # Started from this thread inside the namespace (a child is born in its parent
        # thread's), not through a preexec_fn: that makes the interpreter fork() the
        # whole process instead of vfork(), ~5 ms of a large compute node's page tables
        # copied while the plumbing waits.
        with netns.inside(self._netns):
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise DnsmasqError(f"dnsmasq for {bridge}: {result.stderr.strip()}")
        _write_if_changed(self.files(short)["argv"], json.dumps(cmd))

    def _start_logged(self, bridge: str, short: str, cmd: list[str]) -> None:
        try:
            self._start(bridge, short, cmd)
        except Exception as exc:
            log.exception("net.dnsmasq_failed", bridge=bridge, error=str(exc))
        finally:
            with self._lock:
                self._starting.pop(short, None)
                reload = short in self._reload
                self._reload.discard(short)
        pid = self.pid(short)
        if reload and pid is not None:
            os.kill(pid, signal.SIGHUP)

    def stop(self, short: str) -> bool:
        """Stop this network's dnsmasq and remove its files (and the run dir once empty);
        whether one was running."""
        with self._lock:
            starting = self._starting.get(short)
        if starting is not None:
            starting.join()
        pid = self.pid(short)
        if pid is not None:
            self._kill(pid)
        for path in [*self.files(short).values(), *self._legacy_files(short).values()]:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty (other networks), or gone
            self._dir.rmdir()
        return pid is not None

    def stop_all(self) -> set[str]:
        """`stop` every dnsmasq of this state dir (a node's teardown in tests and benches);
        the short ids of those that were running."""
        return {short for short in self.running() if self.stop(short)}

    @staticmethod
    def _kill(pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):  # dnsmasq is not our child (it daemonizes): poll /proc
            if not _alive(pid):
                return
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)


def _make_dir(directory: Path) -> None:
    """Make the run dir and the parents it lacks 0755, whatever the umask; DnsmasqError if
    it cannot be made or dnsmasq could not reach it."""
    missing = [d for d in [directory, *directory.parents] if not d.exists()]
    try:
        for made in reversed(missing):
            made.mkdir(exist_ok=True)
            made.chmod(0o755)
        directory.chmod(0o755)
    except OSError as exc:
        raise DnsmasqError(
            f"cannot make dnsmasq's run dir {directory} ({exc.strerror}): set net_dnsmasq_dir "
            "to a directory this user may write"
        ) from None
    _check_reachable(directory)


def _check_reachable(directory: Path) -> None:
    """dnsmasq drops to user nobody and re-reads the hosts file as nobody on SIGHUP: every
    directory above it must be searchable by others, or reloads silently serve nothing."""
    for parent in [directory, *directory.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise DnsmasqError(
                f"{parent} is not searchable by others (o+x): dnsmasq, running as nobody, "
                f"could not re-read {directory}/*.hosts; set net_dnsmasq_dir elsewhere"
            )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_if_changed(path: Path, text: str) -> bool:
    if _read(path) == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    return True
