"""A typed wrapper over the native VMM (`native._vmm`): one `Machine` per guest.

Imports only the standard library and the cffi module, so a per-guest VMM process starts
fast: records are NamedTuples and paths plain strings (dataclasses and pathlib cost ~10 ms of
import time, a quarter of a VMM's start-up), and `typing` (~4 ms with `re`) is read only by
type checkers. Every C failure (-errno plus the handle's error
string) becomes a `VmmError`.
"""

from __future__ import annotations

import errno
import importlib
import os
import select
import time
from types import TracebackType

TYPE_CHECKING = False  # mypy takes the first branch; at run time typing is never imported
if TYPE_CHECKING:
    from collections.abc import Sequence
    from enum import IntEnum
    from typing import Any, NamedTuple
else:
    import collections

    class _IntMember(int):
        """A member of an IntEnum made by `_IntEnumMeta`: the int, its `name` and `value`."""

        __slots__ = ()

        @property
        def name(self):
            return type(self)._names[int(self)]

        @property
        def value(self):
            return int(self)

        def __repr__(self):
            return f"<{type(self).__name__}.{self.name}: {int(self)}>"

        __str__ = int.__repr__  # "1", as IntEnum's

    class _IntEnumMeta(type):
        """`class K(IntEnum): A = 1` at run time without the enum module (it and `functools`
        cost ~3-4 ms of a VMM's start, ~0.1 s of one in a nested L1 under TCG): each member an
        int of the class, one object per value (so `is` holds), `K(value)` the member or
        ValueError, `.name` and `.value` as enum's."""

        def __new__(mcs, name, _bases, ns):
            members = {k: v for k, v in ns.items() if not k.startswith("_")}
            rest = {k: v for k, v in ns.items() if k.startswith("_")}
            cls = super().__new__(mcs, name, (_IntMember,), {**rest, "__slots__": ()})
            cls._members = {}
            cls._names = {}
            for key, value in members.items():
                member = int.__new__(cls, value)
                cls._members[value] = member
                cls._names[value] = key
                type.__setattr__(cls, key, member)
            return cls

        def __call__(cls, value):
            try:
                return cls._members[value]
            except (KeyError, TypeError):
                raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

    IntEnum = type.__new__(_IntEnumMeta, "IntEnum", (_IntMember,), {"__slots__": ()})

    class _NamedTupleMeta(type):
        """`class R(NamedTuple): a: int` at run time: collections.namedtuple of the
        annotated fields (annotations stay strings, so their types are never evaluated)."""

        def __new__(mcs, name, _bases, ns):
            fields = list(ns.get("__annotations__", {}))
            defaults = [ns[f] for f in fields if f in ns]  # trailing fields with values
            record = collections.namedtuple(name, fields, defaults=defaults)
            record.__module__ = ns.get("__module__", record.__module__)
            record.__doc__ = ns.get("__doc__") or record.__doc__
            return record

    NamedTuple = type.__new__(_NamedTupleMeta, "NamedTuple", (), {})

MAX_VCPUS = 64
MAX_MEMORY_MIB = 65536
MIN_MEMORY_MIB = 4
IOAPIC_PINS = 24
MAX_DISKS = 4
MAX_NICS = 4
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


class VmmError(Exception):
    """A native VMM call failed. `errno` is the C error number, `message` the reason."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.message = message
        self.errno = err


class ConfigError(VmmError, ValueError):
    """The machine's configuration (kernel, initrd, memory, vCPUs, cmdline) is unusable."""


class KvmUnavailableError(VmmError):
    """/dev/kvm is missing, inaccessible or lacks a capability the VMM needs."""


class MachineStateError(VmmError):
    """The call is not allowed in the machine's current state (e.g. pause when stopped)."""


class GuestMemoryError(VmmError, ValueError):
    """A guest-physical range is not backed by RAM."""


class SnapshotError(MachineStateError):
    """A snapshot cannot be restored or merged: a missing, truncated or corrupt file (any
    checksum), a newer format version, a memory file of another snapshot, or a machine
    config (vCPUs, memory, devices, CPU features) other than the snapshot's. Nothing was
    changed."""


STATE_FILE = "state"
MEMORY_FILE = "memory"


class EventKind(IntEnum):
    POWEROFF = 1
    REBOOT = 2
    CRASHED = 3
    INTERNAL_ERROR = 4


class MachineState(IntEnum):
    NEW = 0
    CONFIGURED = 1
    RUNNING = 2
    PAUSED = 3
    STOPPED = 4


class ShutdownMethod(IntEnum):
    CTRL_ALT_DEL = 1
    ACPI = 2


class ImageKind(IntEnum):
    PVH = 1
    BZIMAGE = 2
    VMLINUX = 3


class Disk(NamedTuple):
    """A virtio-blk disk on a raw image file or block device (docs/machine.md).

    `read_only`: writes fail in the guest with VIRTIO_BLK_S_IOERR and the file is opened
    O_RDONLY. `id`: the answer to VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    """

    path: str
    read_only: bool = False
    id: str = ""


class Nic(NamedTuple):
    """A virtio-net NIC on a tap fd the caller opened (see `open_tap`) and keeps open.

    `mac`: "aa:bb:cc:dd:ee:ff"; empty picks a random locally administered address.
    """

    tap_fd: int
    mac: str = ""


class VirtioDevice(NamedTuple):
    """A virtio-mmio slot as the host sees it. `broken`: the device saw a malformed request
    and shows NEEDS_RESET until the driver resets it. `ops`: disks (reads, writes, errors,
    0), NICs (frames received, sent, dropped on receive, dropped on send)."""

    slot: int
    kind: str
    base: int
    gsi: int
    status: int
    broken: bool
    malformed: int
    interrupts: int
    ops: tuple[int, int, int, int]


def open_tap(name: str, *, vnet_hdr: bool = False) -> int:
    """Opens (or creates, as root) the tap interface `name` and returns its fd (the caller
    closes it). Configuring the interface (addresses, bridges, up) is the caller's business.
    `vnet_hdr`: a virtio-net header on every frame, which gives the guest checksum offload
    and TSO both ways (native/virtio/net.c). Raises OSError."""
    import fcntl  # noqa: PLC0415 - only callers with NICs pay for these imports
    import struct  # noqa: PLC0415

    flags = _IFF_TAP | _IFF_NO_PI | (0x4000 if vnet_hdr else 0)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parse_mac(mac: str) -> bytes:
    if not mac:
        return bytes([0x52, 0x54, 0x00]) + os.urandom(3)
    parts = mac.split(":")
    try:
        value = bytes(int(p, 16) for p in parts)
    except ValueError:
        value = b""
    if len(parts) != 6 or len(value) != 6 or any(len(p) != 2 for p in parts):
        raise ConfigError(f"MAC address {mac!r} is not aa:bb:cc:dd:ee:ff", errno.EINVAL)
    return value


class SnapshotInfo(NamedTuple):
    """What a snapshot's state file says (its checksums verified). `kind`: "full" or "diff";
    `id`/`parent`: hex ids (a diff's parent is the snapshot it applies onto, else "")."""

    kind: str
    version: int
    vcpus: int
    memory_mib: int
    disks: int
    macs: tuple[str, ...]
    id: str
    parent: str


class SnapshotStats(NamedTuple):
    """What a save wrote and how long each part took (milliseconds). `paused_ms`: how long
    the save held the machine paused (a live save: its last pass and the state; else all
    of it); `pages_paused` and `passes`: a live save's pages written paused (counted in
    `memory_pages` too, as are pages written twice) and its passes while the guest ran."""

    state_bytes: int
    memory_pages: int
    memory_runs: int
    state_ms: float
    memory_ms: float
    sync_ms: float
    paused_ms: float = 0.0
    pages_paused: int = 0
    passes: int = 0


def _snapshot_paths(
    snapshot: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]],
    *,
    create: bool = False,
) -> tuple[bytes, bytes]:
    """(state, memory) paths: a directory holds `state` and `memory`, or a pair names both."""
    if isinstance(snapshot, tuple):
        return os.fsencode(snapshot[0]), os.fsencode(snapshot[1])
    directory = os.fsencode(snapshot)
    if create:
        os.makedirs(directory, exist_ok=True)  # noqa: PTH103
    return (
        os.path.join(directory, STATE_FILE.encode()),  # noqa: PTH118 (pathlib: ~3 ms import)
        os.path.join(directory, MEMORY_FILE.encode()),  # noqa: PTH118
    )


def _remove_stale_temporaries(*paths: bytes) -> None:
    """Deletes `<path>.tmp-<pid>` files a save killed midway left (their pid is gone)."""
    for path in paths:
        directory, name = os.path.split(path)
        prefix = name + b".tmp-"
        for entry in os.listdir(directory or b"."):  # noqa: PTH208
            if not entry.startswith(prefix) or not entry[len(prefix) :].isdigit():
                continue
            try:
                os.kill(int(entry[len(prefix) :]), 0)
            except ProcessLookupError:
                try:
                    os.unlink(os.path.join(directory, entry))  # noqa: PTH108, PTH118
                except FileNotFoundError:
                    pass  # another save cleaned it up first
            except PermissionError:
                pass  # another user's live process


def snapshot_info(
    snapshot: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]],
) -> SnapshotInfo:
    """Reads and checks a snapshot's state file (header, every section's checksum, the
    config); raises SnapshotError when it is not a valid one."""
    mod = _vmm()
    state, _ = _snapshot_paths(snapshot)
    info = mod.ffi.new("struct fl_snapshot_info *")
    err = mod.ffi.new("char[256]")
    rc = mod.lib.fl_snapshot_info(state, info, err, 256)
    if rc < 0:
        raise SnapshotError(_text(mod.ffi, err), -rc)
    return SnapshotInfo(
        kind="diff" if info.kind == 2 else "full",
        version=int(info.version),
        vcpus=int(info.vcpus),
        memory_mib=int(info.memory_mib),
        disks=int(info.ndisks),
        macs=tuple(bytes(info.macs[i]).hex(":") for i in range(int(info.nnics))),
        id=bytes(info.id).hex(),
        parent=bytes(info.parent).hex() if info.kind == 2 else "",
    )


def merge_snapshot(
    base: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]],
    diff: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]],
    out_memory: str | os.PathLike[str] | None = None,
) -> None:
    """Applies diff snapshot `diff`'s pages onto its base's memory file, writing a full memory
    file to `out_memory` (default: the diff's own memory file, replaced by rename, so the
    diff then restores on its own). The base is left as it was. Raises SnapshotError when the
    diff is not of that base or a file is invalid, VmmError on I/O errors."""
    mod = _vmm()
    _, base_mem = _snapshot_paths(base)
    _, diff_mem = _snapshot_paths(diff)
    out = diff_mem if out_memory is None else os.fsencode(out_memory)
    err = mod.ffi.new("char[256]")
    rc = mod.lib.fl_snapshot_merge(base_mem, diff_mem, out, err, 256)
    if rc < 0:
        cls = SnapshotError if -rc in (errno.EINVAL, errno.ENOENT, errno.ENODATA) else VmmError
        raise cls(_text(mod.ffi, err), -rc)


class Event(NamedTuple):
    """A machine event. POWEROFF/REBOOT/INTERNAL_ERROR end the machine; CRASHED does not.

    `code`: the exit status for POWEROFF (debug exit: `(v << 1) | 1`, ACPI: 0), the KVM exit
    reason for INTERNAL_ERROR. `reason`: e.g. "acpi_s5", "debug_exit", "i8042_reset",
    "reset_control", "triple_fault", "pvpanic", "emulation_failure". `detail`: raw values
    (INTERNAL_ERROR: suberror, then KVM's data words).
    """

    kind: EventKind
    reason: str
    code: int
    vcpu: int
    detail: tuple[int, int, int, int]


class DeviceCounters(NamedTuple):
    reads: int
    writes: int
    bytes_in: int
    bytes_out: int


class Counters(NamedTuple):
    exits: dict[str, int]
    unhandled_io: int
    unhandled_mmio: int
    console_in_bytes: int
    console_out_bytes: int
    console_dropped: int
    devices: dict[str, DeviceCounters]


class ImageInfo(NamedTuple):
    kind: ImageKind
    entry: int
    load_start: int
    load_end: int
    setup_version: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    nsegments: int


_EXIT_FIELDS = (
    "total",
    "io",
    "mmio",
    "intr",
    "hlt",
    "shutdown",
    "system_event",
    "internal_error",
    "other",
)
_KVM_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENODEV, errno.ENOTSUP}
_CONFIG_ERRNOS = {
    errno.EINVAL,
    errno.ENOENT,
    errno.ENOEXEC,
    errno.EFBIG,
    errno.EISDIR,
    errno.ENOMEM,
    errno.ENOSPC,
    errno.EBUSY,  # a disk another VMM (or the storage agent) holds locked
}


def _vmm() -> Any:
    # Imported on first use so `import native` works before the extension is built.
    return importlib.import_module("native._vmm")


def _text(ffi: Any, cstr: Any) -> str:
    return str(ffi.string(cstr).decode("utf-8", "replace"))


def parse_image(data: bytes) -> ImageInfo:
    """Parses a kernel image (PVH ELF, bzImage, vmlinux) as the loader would, without KVM.

    Raises ConfigError with the loader's reason when the image is malformed.
    """
    mod = _vmm()
    info = mod.ffi.new("struct fl_image_info *")
    err = mod.ffi.new("char[256]")
    rc = mod.lib.fl_image_parse(data, len(data), info, err, 256)
    if rc < 0:
        raise ConfigError(_text(mod.ffi, err), -rc)
    return ImageInfo(
        kind=ImageKind(info.kind),
        entry=info.entry,
        load_start=info.load_start,
        load_end=info.load_end,
        setup_version=info.setup_version,
        init_size=info.init_size,
        initrd_addr_max=info.initrd_addr_max,
        cmdline_size=info.cmdline_size,
        nsegments=info.nsegments,
    )


def kvm_unavailable_reason() -> str | None:
    """None when a VM can be created here, else why not (KVM_CREATE_VM's error)."""
    mod = _vmm()
    err = mod.ffi.new("char[256]")
    if mod.lib.fl_kvm_probe(err, 256) < 0:
        return _text(mod.ffi, err)
    return None


class _Devices:
    """The disks and NICs of a configure or restore as C structs (kept alive with it)."""

    def __init__(
        self, ffi: Any, disks: Sequence[Disk], nics: Sequence[Nic], *, random_macs: bool
    ) -> None:
        if len(disks) > MAX_DISKS or len(nics) > MAX_NICS:
            raise ConfigError(f"at most {MAX_DISKS} disks and {MAX_NICS} NICs", errno.EINVAL)
        macs = [_parse_mac(n.mac) if (n.mac or random_macs) else bytes(6) for n in nics]
        self._ffi = ffi
        self._keep: list[Any] = []
        self.disks_c = ffi.new("struct fl_disk_config[]", max(len(disks), 1))
        for i, disk in enumerate(disks):
            self._keep += [ffi.new("char[]", os.fsencode(disk.path))]
            self._keep += [ffi.new("char[]", disk.id.encode()[:20])]
            self.disks_c[i].path, self.disks_c[i].id = self._keep[-2], self._keep[-1]
            self.disks_c[i].flags = 1 if disk.read_only else 0
        self.nics_c = ffi.new("struct fl_nic_config[]", max(len(nics), 1))
        for i, nic in enumerate(nics):
            self.nics_c[i].tap_fd = nic.tap_fd
            self.nics_c[i].mac = list(macs[i])
        self.ndisks = len(disks)
        self.nnics = len(nics)
        self.macs = [m.hex(":") for m in macs]

    def config(self, **fields: Any) -> Any:
        cfg = self._ffi.new("struct fl_config *", fields)
        cfg.ndisks, cfg.disks = self.ndisks, self.disks_c
        cfg.nnics, cfg.nics = self.nnics, self.nics_c
        return cfg


class Machine:
    """One virtual machine on /dev/kvm, configured (kernel loaded) by the constructor.

    Lifecycle: `start()` → running ⇄ `pause()`/`resume()` → stopped (a terminal event, or
    `stop()`); `close()` releases everything and is idempotent; also a context manager.
    Events arrive on `event_fd` (poll it) and are read with `read_event()`/`wait_event()`.
    The console fds are borrowed, never closed.
    """

    def __init__(
        self,
        kernel: str | os.PathLike[str],
        *,
        initrd: str | os.PathLike[str] | None = None,
        cmdline: str = "",
        memory_mib: int = 128,
        vcpus: int = 1,
        console_out: int | None = None,
        console_in: int | None = None,
        memfd: bool = False,
        disks: Sequence[Disk] = (),
        nics: Sequence[Nic] = (),
    ) -> None:
        self._check_args(kernel, initrd, cmdline, memory_mib, vcpus)
        mod = _vmm()
        self._ffi = mod.ffi
        self._lib = mod.lib
        self._vm: Any = None
        devices = _Devices(self._ffi, disks, nics, random_macs=True)
        # The C side reads these during configure only; keep them alive until then.
        kernel_c = self._ffi.new("char[]", os.fsencode(kernel))
        initrd_c = self._ffi.new("char[]", os.fsencode(initrd)) if initrd else self._ffi.NULL
        cmdline_c = self._ffi.new("char[]", cmdline.encode())
        cfg = devices.config(
            kernel_path=kernel_c,
            initrd_path=initrd_c,
            cmdline=cmdline_c,
            memory_mib=memory_mib,
            vcpus=vcpus,
            console_out_fd=-1 if console_out is None else console_out,
            console_in_fd=-1 if console_in is None else console_in,
            flags=1 if memfd else 0,
        )
        self._vm = self._new_handle()
        rc = self._lib.fl_vm_configure(self._vm, cfg)
        if rc < 0:
            self._fail_build(-rc, ConfigError)
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.macs = devices.macs

    def _new_handle(self) -> Any:
        vm = self._lib.fl_vm_new()
        if vm == self._ffi.NULL:
            raise VmmError("out of memory allocating a machine", errno.ENOMEM)
        return vm

    def _fail_build(self, err: int, invalid: type[VmmError]) -> None:
        """Frees the handle a failed configure or restore left NEW and raises its error."""
        message = self._error()
        self._lib.fl_vm_destroy(self._vm)
        self._vm = None
        if err in _KVM_ERRNOS and ("/dev/kvm" in message or "KVM" in message):
            raise KvmUnavailableError(message, err)
        if err == errno.EINVAL:
            raise invalid(message, err)
        if err in _CONFIG_ERRNOS:
            raise ConfigError(message, err)
        raise VmmError(message, err)

    @classmethod
    def restore(
        cls,
        snapshot: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]],
        *,
        console_out: int | None = None,
        console_in: int | None = None,
        disks: Sequence[Disk] = (),
        nics: Sequence[Nic] = (),
    ) -> Machine:
        """A new machine from a snapshot (a directory from `save`, or a (state, memory) pair
        of paths), CONFIGURED: `start()` runs the guest on from where it was saved.

        Guest RAM maps the memory file copy-on-write (read lazily, never written), so the
        file must stay in place while the machine lives. `disks`/`nics`: the same kinds, in
        the same order, sizes and read-only flags as when saved (the caller carries the
        disks' contents over); a NIC without a MAC takes the saved one. Raises SnapshotError
        (a file missing, truncated or corrupt, a newer format, another machine config), and
        nothing has been started or changed then.
        """
        if len(disks) > MAX_DISKS or len(nics) > MAX_NICS:
            raise ConfigError(f"at most {MAX_DISKS} disks and {MAX_NICS} NICs", errno.EINVAL)
        state, memory = _snapshot_paths(snapshot)
        self = cls.__new__(cls)
        mod = _vmm()
        self._ffi = mod.ffi
        self._lib = mod.lib
        self._vm = None
        devices = _Devices(self._ffi, disks, nics, random_macs=False)
        cfg = devices.config(
            console_out_fd=-1 if console_out is None else console_out,
            console_in_fd=-1 if console_in is None else console_in,
        )
        self._vm = self._new_handle()
        rc = self._lib.fl_snapshot_restore(self._vm, cfg, state, memory)
        if rc < 0:
            self._fail_build(-rc, SnapshotError)
        info = snapshot_info((os.fsdecode(state), os.fsdecode(memory)))
        self.memory_mib = info.memory_mib
        self.vcpus = info.vcpus
        self.macs = list(info.macs)
        return self

    @staticmethod
    def _check_args(
        kernel: str | os.PathLike[str],
        initrd: str | os.PathLike[str] | None,
        cmdline: str,
        memory_mib: int,
        vcpus: int,
    ) -> None:
        if not os.path.isfile(kernel):  # noqa: PTH113 (pathlib: ~3 ms import)
            raise ConfigError(f"kernel {os.fspath(kernel)!s} is not a file", errno.ENOENT)
        if initrd is not None and not os.path.isfile(initrd):  # noqa: PTH113
            raise ConfigError(f"initrd {os.fspath(initrd)!s} is not a file", errno.ENOENT)
        if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
            raise ConfigError(
                f"memory must be {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB} MiB, not {memory_mib}",
                errno.EINVAL,
            )
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ConfigError(f"vCPU count must be 1..{MAX_VCPUS}, not {vcpus}", errno.EINVAL)
        if "\0" in cmdline:
            raise ConfigError("command line contains a NUL byte", errno.EINVAL)

    # -- plumbing ---------------------------------------------------------------------------

    def _handle(self) -> Any:
        if self._vm is None:
            raise MachineStateError("machine is closed", errno.EBADF)
        return self._vm

    def _error(self) -> str:
        return _text(self._ffi, self._lib.fl_vm_error(self._vm))

    def _call(self, rc: int) -> None:
        if rc >= 0:
            return
        err = -rc
        message = self._error()
        if err in (errno.EINVAL, errno.ESRCH, errno.EBUSY):
            raise MachineStateError(message, err)
        if err == errno.EFAULT:
            raise GuestMemoryError(message, err)
        raise VmmError(message, err)

    # -- control ----------------------------------------------------------------------------

    def state(self) -> MachineState:
        """The current state; it changes on its own when the guest ends (STOPPED)."""
        if self._vm is None:
            return MachineState.STOPPED
        return MachineState(self._lib.fl_vm_state(self._vm))

    def start(self) -> None:
        """Starts every vCPU thread (APs wait for INIT/SIPI). Raises MachineStateError."""
        self._call(self._lib.fl_vm_start(self._handle()))

    def pause(self) -> None:
        """Returns once every vCPU is parked outside the guest."""
        self._call(self._lib.fl_vm_pause(self._handle()))

    def resume(self) -> None:
        self._call(self._lib.fl_vm_resume(self._handle()))

    def shutdown(self, method: ShutdownMethod = ShutdownMethod.CTRL_ALT_DEL) -> None:
        """Asks the guest to shut down; it ends with a POWEROFF event if it cooperates."""
        self._call(self._lib.fl_vm_shutdown(self._handle(), int(method)))

    def stop(self) -> None:
        """Hard stop: vCPU threads end and are joined. Idempotent."""
        if self._vm is not None:
            self._call(self._lib.fl_vm_stop(self._vm))

    def close(self) -> None:
        """Stops the machine and frees it. Idempotent."""
        if self._vm is not None:
            self._lib.fl_vm_destroy(self._vm)
            self._vm = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_vm", None) is not None:
            self.close()

    # -- events -----------------------------------------------------------------------------

    @property
    def event_fd(self) -> int:
        """Readable while events are queued. Valid until close()."""
        return int(self._lib.fl_event_fd(self._handle()))

    def read_event(self) -> Event | None:
        """The oldest queued event, or None."""
        ev = self._ffi.new("struct fl_event *")
        rc = self._lib.fl_event_read(self._handle(), ev)
        self._call(rc)
        if rc == 0:
            return None
        return Event(
            kind=EventKind(ev.kind),
            reason=_text(self._ffi, ev.reason),
            code=int(ev.code),
            vcpu=int(ev.vcpu),
            detail=(int(ev.detail[0]), int(ev.detail[1]), int(ev.detail[2]), int(ev.detail[3])),
        )

    def wait_event(self, timeout: float | None = None) -> Event | None:
        """Waits up to `timeout` seconds (None: forever) for an event; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.event_fd, select.POLLIN)
        while True:
            event = self.read_event()
            if event is not None:
                return event
            if deadline is None:
                poller.poll()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poller.poll(max(1, int(left * 1000)))

    # -- interrupts -------------------------------------------------------------------------

    def bind_irq_eventfd(self, gsi: int, fd: int) -> None:
        """Makes each 8-byte write to eventfd `fd` an edge on IOAPIC pin `gsi` (0..23).

        KVM delivers it without a VMM thread while the guest has the pin unmasked; while the
        pin is masked the edge is dropped (KVM looks the route up in a kernel worker, so an
        edge written just before the guest unmasks the pin may still land after it). The
        caller keeps `fd` open or closes it; the binding lasts as long as the machine.
        Raises ValueError for a pin out of range and MachineStateError once the machine has
        stopped.
        """
        if not 0 <= gsi < IOAPIC_PINS:
            raise ValueError(f"GSI must be 0..{IOAPIC_PINS - 1}, not {gsi}")
        self._call(self._lib.fl_vm_irqfd(self._handle(), gsi, fd))

    # -- virtio devices ---------------------------------------------------------------------

    def virtio_devices(self) -> list[VirtioDevice]:
        """The virtio-mmio slots, disks first, then NICs, in the order given."""
        vm = self._handle()
        info = self._ffi.new("struct fl_virtio_info *")
        out: list[VirtioDevice] = []
        for slot in range(int(self._lib.fl_virtio_count(vm))):
            self._call(self._lib.fl_virtio_info(vm, slot, info))
            out.append(
                VirtioDevice(
                    slot=slot,
                    kind="net" if info.device_id == 1 else "blk",
                    base=int(info.base),
                    gsi=int(info.gsi),
                    status=int(info.status),
                    broken=bool(info.broken),
                    malformed=int(info.malformed),
                    interrupts=int(info.interrupts),
                    ops=(int(info.ops[0]), int(info.ops[1]), int(info.ops[2]), int(info.ops[3])),
                )
            )
        return out

    def describe_vcpus(self) -> str:
        """One line per vCPU (run state, RIP, IF, the local APIC's IRR, ISR and timer), as
        QEMU's `info registers` and `info lapic` would tell; only while paused."""
        size = 256 * max(self.vcpus, 1)
        buf = self._ffi.new("char[]", size)
        n = int(self._lib.fl_vm_describe_vcpus(self._handle(), buf, size))
        self._call(n)
        return bytes(self._ffi.buffer(buf, n)).decode(errors="replace")

    def describe(self) -> str:
        """`describe_vcpus` (the running machine paused for a moment to read them) then
        `describe_devices`. Raises what `pause` raises (a machine that ended)."""
        self.pause()
        try:
            vcpus = self.describe_vcpus()
        finally:
            self.resume()
        return vcpus + self.describe_devices().rstrip("\n")

    def describe_devices(self) -> str:
        """The IOAPIC's lines and live entries, the UART's registers and every virtio
        queue's indexes (ours and the guest's) as text: where an interrupt or a
        notification went missing in a guest that stands still. Paused or running."""
        size = 16384
        buf = self._ffi.new("char[]", size)
        n = int(self._lib.fl_vm_describe(self._handle(), buf, size))
        self._call(n)
        return bytes(self._ffi.buffer(buf, n)).decode(errors="replace")

    def save_device(self, slot: int) -> bytes:
        """Virtio slot `slot`'s transport and queue state as an opaque blob (magic, version,
        checksum). Only while paused (MachineStateError otherwise)."""
        size = int(self._lib.fl_device_state_size())
        buf = self._ffi.new("char[]", size)
        self._call(self._lib.fl_device_save(self._handle(), slot, buf, size))
        return bytes(self._ffi.buffer(buf, size))

    def restore_device(self, slot: int, blob: bytes) -> None:
        """Loads a blob from save_device into slot `slot`; only while paused. A blob that is
        corrupt, of another version or device type, or whose rings lie outside this
        machine's RAM raises MachineStateError (EINVAL)."""
        self._call(self._lib.fl_device_restore(self._handle(), slot, blob, len(blob)))

    # -- state (while paused) ---------------------------------------------------------------

    def save_vcpu(self, index: int) -> bytes:
        """vCPU `index`'s registers, MSRs, LAPIC and events as an opaque versioned blob.

        Only while paused (MachineStateError otherwise).
        """
        size = int(self._lib.fl_vcpu_state_size())
        buf = self._ffi.new("char[]", size)
        self._call(self._lib.fl_vcpu_save(self._handle(), index, buf, size))
        return bytes(self._ffi.buffer(buf, size))

    def restore_vcpu(self, index: int, blob: bytes) -> None:
        """Loads a blob from save_vcpu into vCPU `index`; only while paused."""
        self._call(self._lib.fl_vcpu_restore(self._handle(), index, blob, len(blob)))

    # -- snapshots --------------------------------------------------------------------------

    def save(
        self,
        snapshot: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]],
        *,
        diff: bool = False,
        live: bool = False,
        keep_paused: bool = False,
    ) -> SnapshotStats:
        """Writes the paused machine to a snapshot: a directory (created if needed) that gets
        `state` and `memory`, or a (state, memory) pair of paths (docs/machine.md).

        `diff`: only the pages written since this machine's last snapshot (taken, or
        restored from); `merge_snapshot` applies it onto that one's memory. Each file is
        written under a temporary name, fsync'd and renamed (memory first), so an
        interrupted save never leaves a pair that passes as valid. The machine stays
        paused. Raises MachineStateError when it is not paused (or `diff` has no base),
        VmmError on I/O errors (ENOSPC...), with nothing left under the final names.

        `live`: a running machine is saved while it runs. Its RAM is written in passes
        while the guest goes on, each rewriting what the guest wrote during the one
        before; the machine is paused for the last pass and its state only, and runs again
        (unless `keep_paused`) before the files are fsync'd. The snapshot is the machine
        at that pause. A live save that fails leaves a running machine running. A paused
        machine is saved as without `live`.
        """
        state, memory = _snapshot_paths(snapshot, create=True)
        _remove_stale_temporaries(state, memory)
        stats = self._ffi.new("struct fl_snapshot_stats *")
        flags = (
            (self._lib.FL_SNAPSHOT_DIFF if diff else 0)
            | (self._lib.FL_SNAPSHOT_LIVE if live else 0)
            | (self._lib.FL_SNAPSHOT_KEEP_PAUSED if keep_paused else 0)
        )
        self._call(self._lib.fl_snapshot_save(self._handle(), state, memory, flags, stats))
        return SnapshotStats(
            state_bytes=int(stats.state_bytes),
            memory_pages=int(stats.memory_pages),
            memory_runs=int(stats.memory_runs),
            state_ms=stats.ns_state / 1e6,
            memory_ms=stats.ns_memory / 1e6,
            sync_ms=stats.ns_sync / 1e6,
            paused_ms=stats.ns_paused / 1e6,
            pages_paused=int(stats.pages_paused),
            passes=int(stats.passes),
        )

    # -- introspection ----------------------------------------------------------------------

    def read_memory(self, gpa: int, size: int) -> bytes:
        """Copies guest-physical [gpa, gpa+size). Raises GuestMemoryError outside RAM."""
        if gpa < 0 or size < 0:
            raise GuestMemoryError("negative guest address or size", errno.EINVAL)
        buf = self._ffi.new("char[]", max(size, 1))
        self._call(self._lib.fl_memory_read(self._handle(), gpa, buf, size))
        return bytes(self._ffi.buffer(buf, size))

    def counters(self) -> Counters:
        c = self._ffi.new("struct fl_counters *")
        self._call(self._lib.fl_counters_read(self._handle(), c))
        devices: dict[str, DeviceCounters] = {}
        for i in range(min(int(c.ndevices), 32)):
            d = c.devices[i]
            devices[_text(self._ffi, d.name)] = DeviceCounters(
                reads=int(d.reads),
                writes=int(d.writes),
                bytes_in=int(d.bytes_in),
                bytes_out=int(d.bytes_out),
            )
        return Counters(
            exits={name: int(getattr(c, f"exits_{name}")) for name in _EXIT_FIELDS},
            unhandled_io=int(c.unhandled_io),
            unhandled_mmio=int(c.unhandled_mmio),
            console_in_bytes=int(c.console_in_bytes),
            console_out_bytes=int(c.console_out_bytes),
            console_dropped=int(c.console_dropped),
            devices=devices,
        )
