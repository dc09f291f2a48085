"""qemu-img, run on untrusted images: header check and qcow2 → raw conversion, always
with an explicit format.

Each run is bounded (address space, CPU time, wall clock), as OpenStack learnt to do
(OSSA-2015-014: a crafted image can make `qemu-img info` take unbounded memory and time).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from compute_node.storage.errors import BadImage, NoSpace, StorageError

QEMU_IMG = "qemu-img"
INFO_AS_BYTES = 1 << 30
INFO_CPU_SECONDS = 30
CONVERT_TIMEOUT = 3600.0


class ImageFormat(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: str
    virtual_size: int
    backing_file: str | None = None
    data_file: str | None = None
    encrypted: bool = False


def _run(argv: list[str], timeout: float, *, limited: bool) -> str:
    if shutil.which(QEMU_IMG) is None:
        raise StorageError(f"{QEMU_IMG} is not installed (Debian: qemu-utils)")
    if limited:  # prlimit(1), not preexec_fn: the worker that calls this has threads
        argv = ["prlimit", f"--as={INFO_AS_BYTES}", f"--cpu={INFO_CPU_SECONDS}", "--", *argv]
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BadImage(f"{' '.join(argv[-4:])} took longer than {timeout:.0f} s") from None
    if result.returncode != 0:
        if "No space left" in result.stderr:
            raise NoSpace(f"qemu-img: the pool ran out of space: {result.stderr.strip()[-300:]}")
        raise BadImage(f"qemu-img failed on the image: {result.stderr.strip()[-500:]}")
    return result.stdout


def info(path: Path, fmt: str) -> ImageFormat:
    """What qemu-img reads in `path` as format `fmt` (never probed: see formats.py).
    Raises BadImage when qemu-img cannot read it as that format."""
    out = _run(
        [QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)],
        INFO_CPU_SECONDS * 2,
        limited=True,
    )
    try:
        raw = json.loads(out)
        specific = raw.get("format-specific", {}).get("data", {})
        return ImageFormat(
            format=str(raw["format"]),
            virtual_size=int(raw["virtual-size"]),
            backing_file=raw.get("backing-filename") or raw.get("full-backing-filename"),
            data_file=specific.get("data-file"),
            encrypted=bool(raw.get("encrypted", False)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadImage(f"qemu-img info gave no usable answer: {e}") from None


def convert_qcow2_to_raw(src: Path, dst: Path) -> None:
    """Write qcow2 `src` as raw into `dst`, an existing zero-filled file already sized to the
    virtual size (`-n --target-is-zero`: zeros are not written, the result stays sparse)."""
    _run(
        [
            QEMU_IMG,
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-n",
            "--target-is-zero",
            str(src),
            str(dst),
        ],
        CONVERT_TIMEOUT,
        limited=False,
    )
