"""The VMM process's launch config (`vmm.json`) and its optional cgroup v2 limits.

`LaunchConfig` is the one type both sides use: the worker (compute_node/kvm.py) builds one and
`write`s it, the VMM `load_config`s it back and checks it. Standard library only: imported by
`compute_node.vmm` at every guest start.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from compute_node.vmm.frames import CONFIG_FILE

POLICIES = ("destroy", "restart", "preserve")
RING_MIN = 4 * 1024
RING_MAX = 64 * 1024 * 1024
MAX_COPY_DISK = 64  # past any machine's disks: the engine refuses an index it does not have
CGROUP_ROOT = "/sys/fs/cgroup"


class ConfigInvalid(Exception):
    """vmm.json is missing, unreadable or names an unusable machine."""


class DiskConfig(NamedTuple):
    path: str  # /proc/self/fd/N: the worker's descriptor, inherited
    read_only: bool
    id: str  # virtio-blk GET_ID, at most 20 bytes


class RestoreConfig(NamedTuple):
    """Start from a saved state instead of booting (docs/vmm.md, "Save, snapshot, restore")."""

    directory: str  # holds `state` and `memory` (native.Machine.save); stays while it runs
    paused: bool  # stay paused after the restore (journal `paused`, reason start_paused)
    detail: str  # the `started` record's detail: restored | from_snapshot


class IncomingConfig(NamedTuple):
    """Receive the machine from a live migration instead of booting (docs/vmm.md, "Live
    migration"): listen on `address:port` (0: any free port, reported in `status`) for the
    source presenting `token` (64 hex digits); once it commits the guest runs (`started`,
    reason `migrated`), and stays paused if `paused`. A stream that fails before the commit,
    or `timeout_s` without one, ends the process with no lifecycle record."""

    address: str
    port: int
    token: str
    paused: bool
    timeout_s: float
    # The indices of the disks the source copies into this machine's files (a block copy of
    # host-local volumes, docs/migration.md "Block copy"): each file the size of the source's.
    copy_disks: tuple[int, ...] = ()


class LaunchConfig(NamedTuple):
    domain_id: str
    name: str
    kernel: str
    initrd: str | None
    cmdline: str
    disks: list[DiskConfig]
    memory_mib: int
    vcpus: int
    on_poweroff: str
    on_reboot: str
    on_crash: str
    console_ring_bytes: int
    console_log: bool
    start_paused: bool
    cgroup: dict[str, Any] | None
    # (inherited tap fd, guest MAC) per NIC, in order
    nics: tuple[tuple[int, str], ...] = ()
    restore: RestoreConfig | None = None
    incoming: IncomingConfig | None = None

    def write(self, directory: str) -> None:
        """Writes `<directory>/vmm.json` atomically (a temporary file renamed over it),
        mode 0600: an incoming migration's token is in it."""
        doc = self._asdict()
        doc["disks"] = [d._asdict() for d in self.disks]
        doc["nics"] = [{"fd": fd, "mac": mac} for fd, mac in self.nics]
        doc["restore"] = None if self.restore is None else self.restore._asdict()
        doc["incoming"] = None if self.incoming is None else self.incoming._asdict()
        path = os.path.join(directory, CONFIG_FILE)  # noqa: PTH118
        _unlink(path + ".tmp")  # a leftover could have a wider mode
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:  # noqa: PTH123
            f.write(json.dumps(doc))
        os.replace(path + ".tmp", path)  # noqa: PTH105 (pathlib costs the VMM import time)


def load_config(path: str) -> LaunchConfig:
    """Parses and checks vmm.json; raises ConfigInvalid with the reason."""
    try:
        with open(path, "rb") as f:  # noqa: PTH123
            raw = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigInvalid(f"cannot read {CONFIG_FILE}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigInvalid(f"{CONFIG_FILE} must hold a JSON object")

    def field(key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in raw:
            if default is ...:
                raise ConfigInvalid(f"{CONFIG_FILE}: missing {key!r}")
            return default
        value = raw[key]
        # bool is an int: refuse it where a number is meant.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigInvalid(f"{CONFIG_FILE}: {key!r} has the wrong type")
        return value

    domain_id = field("domain_id", str)
    if not domain_id or "/" in domain_id or domain_id in (".", "..") or len(domain_id) > 200:
        raise ConfigInvalid(f"{CONFIG_FILE}: bad domain_id {domain_id!r}")
    policies = {}
    for key, default in (
        ("on_poweroff", "destroy"),
        ("on_reboot", "restart"),
        ("on_crash", "destroy"),
    ):
        value = field(key, str, default)
        if value not in POLICIES:
            raise ConfigInvalid(f"{CONFIG_FILE}: {key} must be one of {', '.join(POLICIES)}")
        policies[key] = value
    cgroup = field("cgroup", (dict, type(None)), None)
    disks = [_disk(d) for d in field("disks", list, [])]
    nics = []
    for nic in field("nics", list, []):
        fd = nic.get("fd") if isinstance(nic, dict) else None
        mac = nic.get("mac") if isinstance(nic, dict) else None
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 3 or not isinstance(mac, str):
            raise ConfigInvalid(f"{CONFIG_FILE}: each NIC needs an inherited fd and a mac")
        nics.append((fd, mac))
    return LaunchConfig(
        domain_id=domain_id,
        name=field("name", str),
        kernel=field("kernel", str),
        initrd=field("initrd", (str, type(None)), None),
        cmdline=field("cmdline", str, ""),
        disks=disks,
        memory_mib=field("memory_mib", int),
        vcpus=field("vcpus", int, 1),
        on_poweroff=policies["on_poweroff"],
        on_reboot=policies["on_reboot"],
        on_crash=policies["on_crash"],
        console_ring_bytes=min(max(field("console_ring_bytes", int, 65536), RING_MIN), RING_MAX),
        console_log=field("console_log", bool, True),
        start_paused=field("start_paused", bool, False),
        cgroup=cgroup,
        nics=tuple(nics),
        restore=_restore(field("restore", (dict, type(None)), None)),
        incoming=_incoming(field("incoming", (dict, type(None)), None)),
    )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)  # noqa: PTH108
    except OSError:
        pass


def _incoming(raw: dict[str, Any] | None) -> IncomingConfig | None:
    if raw is None:
        return None
    address, port, token = raw.get("address"), raw.get("port"), raw.get("token")
    paused, timeout_s = raw.get("paused"), raw.get("timeout_s")
    if (
        not isinstance(address, str)
        or not isinstance(port, int)
        or isinstance(port, bool)
        or not 0 <= port <= 65535
        or not isinstance(token, str)
        or len(token) != 64
        or any(c not in "0123456789abcdef" for c in token)
        or not isinstance(paused, bool)
        or not isinstance(timeout_s, (int, float))
        or isinstance(timeout_s, bool)
        or not timeout_s > 0
    ):
        raise ConfigInvalid(
            f"{CONFIG_FILE}: incoming is {{address, port (0..65535), token (64 hex digits), "
            "paused, timeout_s (> 0), copy_disks (disk indices, optional)}"
        )
    copy = raw.get("copy_disks", [])
    if not isinstance(copy, list) or any(
        not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_COPY_DISK for i in copy
    ):
        raise ConfigInvalid(f"{CONFIG_FILE}: incoming copy_disks is a list of disk indices")
    return IncomingConfig(address, port, token, paused, float(timeout_s), tuple(copy))


def _restore(raw: dict[str, Any] | None) -> RestoreConfig | None:
    if raw is None:
        return None
    directory, paused, detail = raw.get("directory"), raw.get("paused"), raw.get("detail")
    if (
        not isinstance(directory, str)
        or not directory
        or not isinstance(paused, bool)
        or detail not in ("restored", "from_snapshot")
    ):
        raise ConfigInvalid(
            f"{CONFIG_FILE}: restore is {{directory, paused, detail: restored|from_snapshot}}"
        )
    return RestoreConfig(directory, paused, detail)


def _disk(raw: Any) -> DiskConfig:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("path"), str)
        or not isinstance(raw.get("read_only", False), bool)
        or not isinstance(raw.get("id", ""), str)
        or len(raw.get("id", "").encode()) > 20
    ):
        raise ConfigInvalid(f"{CONFIG_FILE}: a disk is {{path, read_only, id (<= 20 bytes)}}")
    return DiskConfig(raw["path"], raw.get("read_only", False), raw.get("id", ""))


def join_cgroup(domain_id: str, limits: dict[str, Any]) -> tuple[str | None, str | None]:
    """Moves this process into <root>/flotilla/<domain_id> with the given limits.

    Returns (cgroup path, None) or (None, why not); never raises: limits are best effort.
    """
    if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):  # noqa: PTH110, PTH118
        return None, f"cgroup v2 is not mounted at {CGROUP_ROOT}"
    parent = os.path.join(CGROUP_ROOT, "flotilla")  # noqa: PTH118
    path = os.path.join(parent, domain_id)  # noqa: PTH118
    try:
        os.makedirs(path, exist_ok=True)  # noqa: PTH103
        # Controllers must be enabled top-down; a parent that already has them is fine.
        for where in (CGROUP_ROOT, parent):
            _write(os.path.join(where, "cgroup.subtree_control"), "+cpu +memory")  # noqa: PTH118
        if limits.get("cpu_max") is not None:
            _write(os.path.join(path, "cpu.max"), str(limits["cpu_max"]))  # noqa: PTH118
        if limits.get("memory_max") is not None:
            _write(os.path.join(path, "memory.max"), str(limits["memory_max"]))  # noqa: PTH118
        _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))  # noqa: PTH118
    except OSError as exc:
        return None, f"cgroup {path}: {exc.strerror or exc}"
    return path, None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:  # noqa: PTH123
        f.write(text)
