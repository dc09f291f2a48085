"""Real file systems for storage tests: XFS with reflink and ext4 on loop devices, and a
small tmpfs, each made under TMPDIR and always unmounted and detached afterwards.

Needs root (losetup, mount) and mkfs.xfs (xfsprogs) / mkfs.ext4 (e2fsprogs); CI runs as
root. Without them the fixtures fail and say what is missing; they never skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

FsKind = Literal["xfs", "ext4"]
MKFS: dict[FsKind, list[str]] = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
XFS_MIN_BYTES = 300 << 20  # mkfs.xfs refuses anything smaller


def missing_for(kind: FsKind | Literal["tmpfs"]) -> str | None:
    """Why this machine cannot make such a file system here, or None if it can."""
    if os.geteuid() != 0:
        return "storage file-system tests need root (losetup, mount); CI runs as root"
    if kind != "tmpfs":
        tool = MKFS[kind][0]
        if shutil.which(tool) is None:
            package = "xfsprogs" if kind == "xfs" else "e2fsprogs"
            return f"{tool} is missing: apt-get install -y {package} (listed in .ci/install)"
        if shutil.which("losetup") is None:
            return "losetup is missing: apt-get install -y mount"
    return None


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _unmount(mountpoint: Path) -> None:
    for _ in range(50):
        if (
            subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode
            == 0
        ):
            return
        time.sleep(0.1)  # a child killed a moment ago may still hold a file open
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@contextlib.contextmanager
def loop_fs(kind: FsKind, size: int) -> Iterator[Path]:
    """A fresh `kind` file system of `size` bytes (a sparse backing file) mounted on a
    directory under TMPDIR; yields the mount point."""
    reason = missing_for(kind)
    if reason is not None:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix=f"flotilla-{kind}-") as tmp:
        backing = Path(tmp) / "backing.img"
        mountpoint = Path(tmp) / "mnt"
        mountpoint.mkdir()
        with backing.open("wb") as f:
            f.truncate(max(size, XFS_MIN_BYTES) if kind == "xfs" else size)
        _run([*MKFS[kind], str(backing)])
        device = _run(["losetup", "--find", "--show", str(backing)])
        try:
            _run(["mount", device, str(mountpoint)])
            try:
                yield mountpoint
            finally:
                _unmount(mountpoint)
        finally:
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


@contextlib.contextmanager
def small_tmpfs(size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes under TMPDIR (to fill up: ENOSPC for real)."""
    reason = missing_for("tmpfs")
    if reason is not None:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="flotilla-tmpfs-") as tmp:
        _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", tmp])
        try:
            yield Path(tmp)
        finally:
            _unmount(Path(tmp))
