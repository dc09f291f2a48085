"""Which host files a domain may boot from, and opening them once for the VMM.

The compute node runs as root, so a path in a spec is a request to read a host file into a
guest. The rule (checked at `define` and again at every `start`):

- every path (`boot.kernel`, `boot.initrd`, `disks.N.path`) is absolute and has no NUL byte;
- a member's path must lie under one of the operator's `allowed_boot_dirs`, both as written
  (with `.` and `..` collapsed) and after resolving symlinks; anything else is refused with
  the rule (`forbidden`), never with what exists on the host;
- an admin (`privileged`) may name any absolute path and gets the detailed reason;
- a member's path disk must be `readonly`: the allowed dirs hold kernels and images that
  other guests boot, and a guest must never write them (writable disks are volumes).

`open()` opens each boot file and path disk once (no symlink at the last step, regular files
only; a writable disk read-write) and checks again where the opened file really is; the VMM
then opens the very same files through inherited descriptors (`/proc/self/fd/N`), so swapping
a file after the check changes nothing. Volumes and images bound by the storage service are
opened the same way by `compute_node.storage_sources`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from protos.domain import DomainSpec, host_paths, spec_problems

MEMBER_RULE = (
    "members may only boot images or files under the directories the operator allows "
    "(allowed_boot_dirs)"
)
MEMBER_DISK_RULE = "members may attach host files only read-only (a writable disk is a volume)"
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class SourceRefused(Exception):
    """A path in the spec may not be used. `code` is `forbidden` (the member rule) or
    `invalid` (a bad path, or for an admin: what is wrong with the file); `field` is the
    spec's dotted path (`boot.kernel`)."""

    def __init__(self, code: str, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.code = code
        self.field = field
        self.message = f"{field}: {reason}"


@dataclass(frozen=True, slots=True)
class HostFile:
    """One opened file: the spec's field, what the spec named (a path, or a volume or image
    of a pool), and the descriptor; a disk also has its `target` (`vdb`), whether the guest
    may write it, and its virtio-blk id (GET_ID, at most 20 bytes)."""

    field: str
    given: str
    fd: int
    target: str | None = None
    read_only: bool = True
    disk_id: str = ""

    @property
    def fd_path(self) -> str:
        """The name a process that inherited `fd` opens the same file by."""
        return f"/proc/self/fd/{self.fd}"


@dataclass
class BootFiles:
    """The opened boot files of one start (kernel, initrd); closes them on exit."""

    files: list[HostFile] = field(default_factory=list)

    def _get(self, name: str) -> HostFile | None:
        return next((f for f in self.files if f.field == name), None)

    @property
    def kernel(self) -> HostFile | None:
        return self._get("boot.kernel")

    @property
    def initrd(self) -> HostFile | None:
        return self._get("boot.initrd")

    @property
    def disks(self) -> list[HostFile]:
        """The disks, in the order of their targets (`vda` is the first virtio-blk slot)."""
        return sorted((f for f in self.files if f.target is not None), key=lambda f: f.target or "")

    def fds(self) -> list[int]:
        return [f.fd for f in self.files]

    def close(self) -> None:
        files, self.files = self.files, []
        for f in files:
            os.close(f.fd)

    def __enter__(self) -> BootFiles:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


class BootSources:
    """The node's rule for host paths in specs (see the module docstring)."""

    def __init__(self, allowed_dirs: Sequence[Path]) -> None:
        self.allowed_dirs = [Path(os.path.normpath(os.path.abspath(d))) for d in allowed_dirs]  # noqa: PTH100

    def check(self, spec: DomainSpec, *, privileged: bool) -> None:
        """Raise SourceRefused for the first path in `spec` the requester may not use.
        Looks at the file system only to resolve symlinks (what a member learns does not
        depend on it)."""
        problems = spec_problems(spec)
        if problems:
            raise SourceRefused("invalid", *problems[0])
        for name, path in host_paths(spec):
            self._admit(name, path, privileged=privileged)
        if not privileged:
            for i, disk in enumerate(spec.disks):
                if disk.path is not None and not disk.readonly:
                    raise SourceRefused("forbidden", f"disks.{i}.readonly", MEMBER_DISK_RULE)

    def open(self, spec: DomainSpec, *, privileged: bool) -> BootFiles:
        """Check `spec` and open its kernel, initrd and path disks (read-write unless
        `readonly`); the caller closes the result (a context manager). Raises SourceRefused."""
        self.check(spec, privileged=privileged)
        files = BootFiles()
        try:
            for name, path in host_paths(spec):
                if name.startswith("boot."):
                    fd = self._open(name, path, privileged=privileged)
                    files.files.append(HostFile(name, path, fd))
                    continue
                disk = spec.disks[int(name.split(".")[1])]
                flags = os.O_RDONLY if disk.readonly else os.O_RDWR
                fd = self._open(name, path, privileged=privileged, flags=flags)
                files.files.append(
                    HostFile(name, path, fd, target=disk.target, read_only=disk.readonly)
                )
        except BaseException:
            files.close()
            raise
        return files

    # ---- the rule ------------------------------------------------------------------------

    def _admit(self, name: str, path: str, *, privileged: bool) -> str:
        """The resolved path, if the (absolute, NUL-free) `path` may be used."""
        resolved = os.path.realpath(path)
        # As written first: a member's `..` never leads the resolver outside the allowed
        # trees, so what it finds there (a symlink or not) cannot change the answer.
        if not privileged and not (
            self._inside(Path(os.path.normpath(path))) and self._inside(Path(resolved))
        ):
            raise SourceRefused("forbidden", name, MEMBER_RULE)
        return resolved

    def _inside(self, path: Path) -> bool:
        """Under an allowed dir, as configured or resolved."""
        for allowed in self.allowed_dirs:
            if path.is_relative_to(allowed) or path.is_relative_to(os.path.realpath(allowed)):
                return True
        return False

    def _open(self, name: str, path: str, *, privileged: bool, flags: int = os.O_RDONLY) -> int:
        resolved = self._admit(name, path, privileged=privileged)
        try:
            fd = os.open(resolved, _OPEN_FLAGS | flags)
        except OSError as exc:
            raise self._refusal(name, f"{path}: {exc.strerror}", privileged) from None
        try:
            self._verify(fd, name, path, privileged=privileged)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _verify(self, fd: int, name: str, path: str, *, privileged: bool) -> None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise self._refusal(name, f"{path}: not a regular file", privileged)
        # Where the opened file really is (a path component may have been swapped for a
        # symlink after the check): a member's must still be inside.
        where = Path(f"/proc/self/fd/{fd}").readlink()
        if not privileged and not self._inside(where):
            raise SourceRefused("forbidden", name, MEMBER_RULE)

    @staticmethod
    def _refusal(name: str, detail: str, privileged: bool) -> SourceRefused:
        # Only an admin learns what the host has; a member gets the rule, found or not.
        if privileged:
            return SourceRefused("invalid", name, detail)
        return SourceRefused("forbidden", name, MEMBER_RULE)
