"""Where saved machine states live on this host, and the disk copies a snapshot holds.

A StateRef names a state; the path is derived here, never taken from the wire
(docs/snapshots.md):

    pool None         <state dir>/states/<state_id>          (this node's own: managed saves)
    a pool            <pool root>/.states/<state_id>         (a `shared` pool: any host;
                                                               a `dir` pool: its host only)

A state is written into `<state_id>.partial` and renamed to `<state_id>` once complete (the
parent directory fsync'd), so a cut-short save or snapshot leaves nothing that passes as a
state; `reconcile()` removes what a killed worker left. Inside a state directory:

    flotilla-state.json   the worker's manifest (what was taken, of which domain, when)
    disks/<target>        each bound volume's contents (a reflink where the file system can,
                          else a sparse copy: compute_node.storage.extents)
    anything else         the driver's (machine state, memory)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from compute_node.storage import Pool, extents
from compute_node.storage.locks import volume_in_use
from compute_node.storage.pool import fsync_dir, no_space_is_clear
from protos.bindings import DiskBinding, StateRef
from protos.domain import PowerState

MANIFEST = "flotilla-state.json"
DISKS = "disks"
PARTIAL = ".partial"
POOL_AREA = ".states"


class StateError(Exception):
    """A state cannot be used; `code` maps to an ErrorReply code, `field` names the culprit."""

    def __init__(self, code: str, message: str, field: str = "state") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class ForeignState(StateError):
    """The state says it is another domain's."""


class Manifest(BaseModel):
    """What the worker wrote beside the driver's files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain_id: uuid.UUID
    memory: bool
    power: PowerState
    disks: list[str]
    taken_at: float
    pause_ms: float = 0.0


class StateAreas:
    """Resolves StateRefs to directories in this node's state dir and pools."""

    def __init__(self, host: str, local_root: Path, pools: Mapping[str, Pool]) -> None:
        self.host = host
        self.local_root = local_root
        self.pools = pools

    def area(self, ref: StateRef) -> Path:
        """The directory holding states like `ref` (made if missing). Raises StateError:
        `not_found` for a pool this node lacks, `invalid` for another host's."""
        if ref.pool is None:
            if ref.host is not None and ref.host != self.host:
                raise StateError(
                    "invalid", f"state {ref.state_id} is kept by host {ref.host}, not {self.host}"
                )
            root = self.local_root
        else:
            pool = self.pools.get(ref.pool)
            if pool is None:
                raise StateError("not_found", f"no pool {ref.pool!r} on host {self.host}", "pool")
            if pool.kind == "dir" and ref.host != self.host:
                raise StateError(
                    "invalid",
                    f"pool {ref.pool!r} is a dir pool of host {ref.host}, not of {self.host}",
                    "pool",
                )
            root = pool.root / POOL_AREA
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root

    def path(self, ref: StateRef) -> Path:
        return self.area(ref) / str(ref.state_id)

    @contextlib.contextmanager
    def writing(self, ref: StateRef) -> Iterator[Path]:
        """An empty directory to write state `ref` into; published under its name when the
        block ends without an error, removed when it raises. `conflict` if it exists."""
        final = self.path(ref)
        if final.exists():
            raise StateError("conflict", f"state {ref.state_id} exists already")
        partial = final.with_name(final.name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o700)
        try:
            yield partial
            for entry in _walk(partial):
                _fsync(entry)
            fsync_dir(partial)
            partial.rename(final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def existing(self, ref: StateRef, domain_id: uuid.UUID) -> tuple[Path, Manifest]:
        """The complete state `ref` of `domain_id` and its manifest. Raises StateError:
        `not_found` when absent, `invalid` when its manifest is unreadable or another
        domain's."""
        path = self.path(ref)
        try:
            raw = (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise StateError("not_found", f"no saved state {ref.state_id} here") from None
        except OSError as exc:
            raise StateError("invalid", f"state {ref.state_id}: {exc.strerror}") from None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError:
            raise StateError("invalid", f"state {ref.state_id}: its manifest is corrupt") from None
        if manifest.domain_id != domain_id:
            raise ForeignState("invalid", f"state {ref.state_id} is another domain's")
        return path, manifest

    def delete(self, ref: StateRef) -> bool:
        """Remove state `ref` (and any partial copy of it); False if it was not there."""
        path = self.path(ref)
        shutil.rmtree(path.with_name(path.name + PARTIAL), ignore_errors=True)
        if not path.exists():
            return False
        # Renamed away first, so a crash mid-delete leaves no directory that looks complete.
        doomed = path.with_name(path.name + PARTIAL)
        path.rename(doomed)
        fsync_dir(path.parent)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def reconcile(self) -> list[str]:
        """Remove the partial states of this node's own area (left by a killed worker)."""
        removed = []
        if self.local_root.is_dir():
            for entry in self.local_root.iterdir():
                if entry.name.endswith(PARTIAL):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        return removed


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(manifest.model_dump_json())


def make_manifest(
    domain_id: uuid.UUID, memory: bool, power: PowerState, disks: list[str], pause_ms: float
) -> Manifest:
    return Manifest(
        domain_id=domain_id,
        memory=memory,
        power=power,
        disks=disks,
        taken_at=time.time(),
        pause_ms=pause_ms,
    )


def allocated_bytes(directory: Path) -> int:
    """Bytes the directory's files have allocated (holes and shared extents as the file
    system counts them: `st_blocks`)."""
    return sum(p.lstat().st_blocks * 512 for p in _walk(directory))


def _walk(directory: Path) -> list[Path]:
    return [Path(root) / name for root, _dirs, files in os.walk(directory) for name in files]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- disks --------------------------------------------------------------------------------


def volume_file(pools: Mapping[str, Pool], binding: DiskBinding) -> Path:
    """The bound volume's file in this node's pool (checked by compute_node.storage)."""
    pool = pools.get(binding.pool)
    if pool is None:
        raise StateError("not_found", f"no pool {binding.pool!r} here", f"disks.{binding.target}")
    return pool.volume_path(str(binding.volume_id))


def copy_disks(pools: Mapping[str, Pool], disks: list[DiskBinding], directory: Path) -> list[str]:
    """Copy each writable bound volume into `directory/disks/<target>` (reflink where the
    file system can, else a sparse copy); return the targets copied. Read-only disks never
    change, so they are not copied. Raises StateError(`no_space`) for a full disk."""
    out = directory / DISKS
    out.mkdir(mode=0o700, exist_ok=True)
    copied = []
    for binding in disks:
        if binding.readonly:
            continue
        source = volume_file(pools, binding)
        _clone(source, out / binding.target, f"disk {binding.target}")
        copied.append(binding.target)
    return copied


def revert_disks(
    pools: Mapping[str, Pool], disks: list[DiskBinding], directory: Path, targets: list[str]
) -> None:
    """Put the snapshot's copies back over the volumes of `targets` (a shut-off domain's):
    each is cloned into a temp file of the volume's pool and renamed over the volume, so a
    volume is either wholly as it was or wholly the snapshot's. `conflict` for a volume
    that something holds open (locked)."""
    by_target = {b.target: b for b in disks}
    for target in targets:
        binding = by_target.get(target)
        if binding is None:
            raise StateError(
                "conflict", f"the snapshot has disk {target}, which the domain no longer has"
            )
        dest = volume_file(pools, binding)
        pool = pools[binding.pool]
        fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if volume_in_use(fd, read_only=False):
                raise StateError("conflict", f"volume of disk {target} is in use")
        finally:
            os.close(fd)
        source = directory / DISKS / target
        with pool.begin() as tmp, no_space_is_clear(f"reverting disk {target}"):
            _fill(source, tmp.fd, pool.capabilities.reflink)
            os.fchmod(tmp.fd, 0o600)
            os.fdatasync(tmp.fd)
            tmp.path.rename(dest)
            tmp.published = True
            fsync_dir(dest.parent)


def _clone(source: Path, dest: Path, what: str) -> None:
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with no_space_is_clear(f"copying {what}"):
            _fill(source, fd, reflink=True)
    finally:
        os.close(fd)


def _fill(source: Path, dst_fd: int, reflink: bool) -> None:
    src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if reflink:
            try:
                if extents.reflink(src_fd, dst_fd):
                    return
            except OSError:
                pass  # another file system's answer: copy instead
        extents.sparse_copy(src_fd, dst_fd, os.fstat(src_fd).st_size)
    finally:
        os.close(src_fd)
