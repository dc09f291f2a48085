"""The storage a definition is bound to, on this host: volumes as disks, images as kernels.

The storage service resolves a tenant's volumes and images into bindings (protos.bindings)
that name a pool and an id, never a path; `DefineDomain` brings them and the node keeps them
with the definition (`StorageBindings`), so every start -- a `start` command, autostart, a
restart after a preserve -- opens the same files the same way:

- the pool is looked up by name among this node's own pools (ComputeConfig.pools); a pool the
  node does not have is `not_found`, a binding for another host's `dir` pool is `invalid`;
- the file is derived from the pool (`Pool.volume_path`, `Pool.image_file`), which refuses
  ids that are not names and symlinks planted in the pool;
- it is opened once (O_NOFOLLOW, a regular file, read-write only for a writable disk) and the
  VMM opens the same file through the inherited descriptor (`/proc/self/fd/N`); its
  virtio-blk takes the volume's OFD lock there (one writer per volume, readers shared: a
  second writer is refused with `conflict`).

Checks that need no file (`check`) run at define, before anything is stored; `open` runs
them again and opens the files at each start.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from compute_node.boot_sources import BootFiles, HostFile, SourceRefused
from compute_node.storage import Pool, StorageError
from compute_node.storage.locks import volume_in_use
from protos.bindings import DiskBinding, ImageRef
from protos.commands import DefineDomain
from protos.domain import MAX_DISKS, DomainSpec

_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
DISK_ID_LEN = 20  # virtio-blk GET_ID answers at most 20 bytes


class StorageBindings(BaseModel):
    """What a definition is bound to in the pools (kept with it by compute_node.store)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    disks: tuple[DiskBinding, ...] = ()
    kernel_image: ImageRef | None = None
    initrd_image: ImageRef | None = None

    @classmethod
    def of(cls, cmd: DefineDomain) -> StorageBindings:
        return cls(
            disks=tuple(cmd.disks), kernel_image=cmd.kernel_image, initrd_image=cmd.initrd_image
        )


def disk_layout(spec: DomainSpec, bindings: StorageBindings) -> dict[str, str]:
    """target → what backs it (a path or a pool volume), the disk list a guest sees."""
    layout = {d.target: f"path:{d.path}:{d.readonly}" for d in spec.disks if d.path is not None}
    readonly = {d.target for d in spec.disks if d.readonly}
    for d in bindings.disks:
        layout[d.target] = f"volume:{d.pool}/{d.volume_id}:{d.readonly or d.target in readonly}"
    return layout


class StorageSources:
    """Resolves and opens a definition's bindings in this host's pools."""

    def __init__(self, host: str, pools: Mapping[str, Pool]) -> None:
        self.host = host
        self.pools = pools

    # ---- what needs no file ----------------------------------------------------------------

    def check(self, spec: DomainSpec, bindings: StorageBindings) -> None:
        """Raise SourceRefused (`invalid`, `not_found`) for the first binding this node cannot
        honour: one that does not match the spec, names a pool this node does not have, or
        another host's pool. Looks at no file."""
        self._check_disks(spec, bindings)
        self._check_images(spec, bindings)

    def _check_disks(self, spec: DomainSpec, bindings: StorageBindings) -> None:
        by_target: dict[str, DiskBinding] = {}
        for i, binding in enumerate(bindings.disks):
            if binding.target in by_target:
                raise SourceRefused("invalid", f"disks.{i}", f"two bindings for {binding.target}")
            by_target[binding.target] = binding
        for i, disk in enumerate(spec.disks):
            bound = by_target.get(disk.target)
            if disk.path is not None and bound is not None:
                raise SourceRefused(
                    "invalid", f"disks.{i}", f"{disk.target} is both a path and a volume"
                )
            if disk.volume_id is not None and (bound is None or bound.volume_id != disk.volume_id):
                raise SourceRefused(
                    "invalid",
                    f"disks.{i}.volume_id",
                    f"volume {disk.volume_id} on {disk.target} was not resolved by the storage "
                    "service (no binding for it)",
                )
        targets = {d.target for d in spec.disks} | set(by_target)
        if len(targets) > MAX_DISKS:
            raise SourceRefused(
                "invalid", "disks", f"{len(targets)} disks; a domain has at most {MAX_DISKS}"
            )
        for i, binding in enumerate(bindings.disks):
            self._pool(f"disks.{i}", binding.pool, binding.host)

    def _check_images(self, spec: DomainSpec, bindings: StorageBindings) -> None:
        kernel, initrd = bindings.kernel_image, bindings.initrd_image
        if spec.boot.image is not None and kernel is None:
            raise SourceRefused(
                "invalid",
                "boot.image",
                f"image {spec.boot.image!r} was not resolved by the storage service",
            )
        if spec.boot.initrd_image is not None and initrd is None:
            raise SourceRefused(
                "invalid",
                "boot.initrd_image",
                f"image {spec.boot.initrd_image!r} was not resolved by the storage service",
            )
        if kernel is not None and spec.boot.kernel is not None:
            raise SourceRefused(
                "invalid", "boot.kernel", "give a kernel path or an image, not both"
            )
        if initrd is not None and (kernel is None or spec.boot.initrd is not None):
            raise SourceRefused(
                "invalid", "boot.initrd", "an initrd image goes with a kernel image, not a path"
            )
        for name, ref in _images(bindings):
            kind = name.removeprefix("boot.")
            if ref is None:
                continue
            if ref.kind != kind:
                raise SourceRefused(
                    "invalid", name, f"image {ref.sha256} is a {ref.kind} image, not a {kind}"
                )
            self._pool(name, ref.pool, ref.host)

    def _pool(self, field: str, name: str, host: str | None) -> Pool:
        pool = self.pools.get(name)
        if host is not None and host != self.host:
            raise SourceRefused(
                "invalid", field, f"pool {name!r} of host {host} is not on this host ({self.host})"
            )
        if pool is None:
            raise SourceRefused("not_found", field, f"no pool {name!r} on host {self.host}")
        if host is None and pool.kind == "dir":
            # A `dir` pool of the same name exists on many hosts: which one is meant?
            raise SourceRefused(
                "invalid", field, f"pool {name!r} is a dir pool: its binding must name its host"
            )
        return pool

    # ---- opening -----------------------------------------------------------------------------

    def exist(self, spec: DomainSpec, bindings: StorageBindings) -> None:
        """`check`, then that every bound file exists (at define: a typo'd id fails there,
        not at the first start). Raises SourceRefused."""
        with BootFiles() as files:
            # Not the locks: a redefinition of a running domain finds its own VMM's.
            self.open(spec, bindings, files, check_locks=False)

    def open(
        self,
        spec: DomainSpec,
        bindings: StorageBindings,
        files: BootFiles,
        *,
        check_locks: bool = True,
    ) -> None:
        """`check`, then open each bound volume and image into `files` (the caller closes
        them). Raises SourceRefused: `not_found` for a missing file, `invalid` for one that
        is not a regular file or not a name in its pool, `conflict` for a volume another
        writer (or, for a writable disk, any user) holds locked."""
        self.check(spec, bindings)
        for name, ref in _images(bindings):
            if ref is None:
                continue
            pool = self._pool(name, ref.pool, ref.host)
            what = f"image {ref.sha256} in pool {ref.pool}"
            try:
                path = pool.image_path(ref.sha256)
            except StorageError as exc:
                raise SourceRefused("invalid", name, f"{what}: {exc.message}") from None
            files.files.append(HostFile(name, what, _open(name, what, path, os.O_RDONLY)))
        readonly = {d.target for d in spec.disks if d.readonly}
        for i, binding in enumerate(bindings.disks):
            field = f"disks.{i}"
            pool = self._pool(field, binding.pool, binding.host)
            what = f"volume {binding.volume_id} in pool {binding.pool}"
            try:
                path = pool.volume_path(str(binding.volume_id))
            except StorageError as exc:
                raise SourceRefused("invalid", field, f"{what}: {exc.message}") from None
            read_only = binding.readonly or binding.target in readonly
            fd = _open(field, what, path, os.O_RDONLY if read_only else os.O_RDWR)
            if check_locks and volume_in_use(fd, read_only=read_only):
                # Said here, before a claim or a VMM; the VMM's own lock decides a race.
                os.close(fd)
                holder = "a writer holds" if read_only else "another process holds"
                raise SourceRefused(
                    "conflict", field, f"{binding.target} ({what}) is in use: {holder} its lock"
                )
            files.files.append(
                HostFile(
                    field,
                    f"{binding.target} ({what})",
                    fd,
                    target=binding.target,
                    read_only=read_only,
                    disk_id=str(binding.volume_id)[:DISK_ID_LEN],
                )
            )


def _images(bindings: StorageBindings) -> tuple[tuple[str, ImageRef | None], ...]:
    return (("boot.kernel", bindings.kernel_image), ("boot.initrd", bindings.initrd_image))


def _open(field: str, what: str, path: Path, mode: int) -> int:
    try:
        fd = os.open(path, _OPEN_FLAGS | mode)
    except FileNotFoundError:
        raise SourceRefused("not_found", field, f"{what} does not exist") from None
    except OSError as exc:
        raise SourceRefused("invalid", field, f"{what}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceRefused("invalid", field, f"{what} is not a regular file")
    return fd
