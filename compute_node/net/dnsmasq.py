"""One dnsmasq per network per host: DHCP with static entries only, bound to the bridge.

Files under `<state_dir>/dnsmasq/`, named by the network's short id: `<id>.hosts` (one
`MAC,IP` line per port, the only addresses handed out), `<id>.pid`, `<id>.argv` (the command
line it was started with) and `<id>.log`. Plugging or unplugging a port rewrites the hosts
file and sends SIGHUP (dnsmasq re-reads it); dnsmasq is restarted only when its command line
would change. DNS answers names of this network's hosts only: nothing is forwarded outside.
"""

from __future__ import annotations

import json
import os
import signal
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
        f"--dhcp-option=option:mtu,{network.mtu}",
        f"--dhcp-option={router}",
        f"--dhcp-option=option:dns-server,{gw.ip}",
        "--dhcp-authoritative",
        "--leasefile-ro",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--domain-needed",
        "--bogus-priv",
    ]


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0", 1)[0].endswith(b"dnsmasq")


class Dnsmasq:
    """`background`: a start does not wait for dnsmasq to be up (it takes tens of ms, more
    on a loaded host) but goes on on a thread of its own, which logs a failure
    (`net.dnsmasq_failed`) rather than raising it; a hosts file rewritten meanwhile is
    reloaded once it is up. A compute node starts guests while their dnsmasq comes up."""

    def __init__(
        self, state_dir: Path, netns_name: str | None = None, *, background: bool = False
    ) -> None:
        self._dir = state_dir / "dnsmasq"
        self._netns = netns_name
        self._background = background
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Thread] = {}
        self._reload: set[str] = set()

    def files(self, network_id_short: str) -> dict[str, Path]:
        base = self._dir / network_id_short
        return {k: base.with_suffix("." + k) for k in ("hosts", "pid", "argv", "log")}

    def pid(self, short: str) -> int | None:
        """The pid of this network's dnsmasq if it is running."""
        try:
            pid = int(self.files(short)["pid"].read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def running(self) -> set[str]:
        """Short ids of the networks whose dnsmasq is running here."""
        if not self._dir.is_dir():
            return set()
        return {p.stem for p in self._dir.glob("*.pid") if self.pid(p.stem) is not None}

    def ensure(self, network: NetworkPlumbing, ports: Iterable[PortPlumbing]) -> str | None:
        """Make this network's dnsmasq serve exactly `ports`; says what it changed (None:
        nothing). Raises DnsmasqError when dnsmasq cannot start."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._dir.chmod(0o755)
        _check_reachable(self._dir)
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
        pid = self.pid(network.short_id)
        same = pid is not None and _read(files["argv"]) == json.dumps(cmd)
        if same and pid is not None:
            if hosts_changed:
                os.kill(pid, signal.SIGHUP)
                return "dnsmasq reloaded"
            return None
        if pid is not None:
            self._kill(pid)
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
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            preexec_fn=netns.preexec(self._netns),
            check=False,
        )
        if result.returncode != 0:
            raise DnsmasqError(f"dnsmasq for {bridge}: {result.stderr.strip()}")
        self.files(short)["argv"].write_text(json.dumps(cmd))

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
        """Stop this network's dnsmasq and remove its files; whether one was running."""
        with self._lock:
            starting = self._starting.get(short)
        if starting is not None:
            starting.join()
        pid = self.pid(short)
        if pid is not None:
            self._kill(pid)
        for path in self.files(short).values():
            path.unlink(missing_ok=True)
        return pid is not None

    @staticmethod
    def _kill(pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):  # dnsmasq is not our child (it daemonizes): poll /proc
            if not _alive(pid):
                return
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)


def _check_reachable(directory: Path) -> None:
    """dnsmasq drops to user nobody and re-reads the hosts file as nobody on SIGHUP: every
    directory above it must be searchable by others, or reloads silently serve nothing."""
    for parent in [directory, *directory.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise DnsmasqError(
                f"{parent} is not searchable by others (o+x): dnsmasq, running as nobody, "
                f"could not re-read {directory}/*.hosts"
            )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_if_changed(path: Path, text: str) -> bool:
    if _read(path) == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    return True
