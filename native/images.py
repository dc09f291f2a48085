"""Linux guest images fetched and built by deploy/images/ (docs/images.md).

`cached_images()` only looks at the cache; `fetch_images()` runs the scripts (which reuse a
complete cache entry) and raises `ImageError` with their output when they fail.
Standard library only.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "deploy" / "images"
# Kernel arguments that shorten the cloud kernel's boot where it is emulated (the hwvirt L1),
# harmless elsewhere: measured there with initcall_debug, init_kprobe_trace (~7.6 s) and
# crypto_kdf108_init (a self-test, ~3.9 s) were ~40% of the kernel's ~27 s of initcalls; the
# clocksource watchdog, the timer check and the speculation mitigations cost more under TCG.
QUICK_BOOT_ARGS = (
    "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init "
    "tsc=reliable no_timer_check mitigations=off"
)


class ImageError(Exception):
    """Fetching the kernel or building the initramfs failed; the message says why."""


@dataclass(frozen=True)
class LinuxImages:
    """One cache entry: Debian's cloud kernel as bzImage and vmlinux, its modules, and the
    test initramfs (None until build-initramfs has run)."""

    release: str
    vmlinuz: Path
    vmlinux: Path
    modules: Path
    initramfs: Path | None


def cache_root() -> Path:
    """Where the scripts keep images: FLOTILLA_IMAGE_CACHE, else the XDG cache."""
    override = os.environ.get("FLOTILLA_IMAGE_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "flotilla" / "images"


def _entry(directory: Path) -> LinuxImages:
    release = directory.name
    initramfs = directory / "initramfs.cpio.gz"
    return LinuxImages(
        release=release,
        vmlinuz=directory / "root" / "boot" / f"vmlinuz-{release}",
        vmlinux=directory / "vmlinux",
        modules=directory / "root" / "lib" / "modules" / release,
        initramfs=initramfs if initramfs.is_file() else None,
    )


def cached_images() -> LinuxImages | None:
    """The entry `current` points at, if fetch-kernel completed it; never runs anything."""
    current = cache_root() / "current"
    if not (current / ".complete").is_file():
        return None
    return _entry(current.resolve())


def fetch_images(*, initramfs: bool = True, timeout: float = 600) -> LinuxImages:
    """Runs fetch-kernel (and build-initramfs when `initramfs`); both skip finished work.

    Raises ImageError with the script's stderr when it fails (no apt access, no lz4, ...).
    """
    script = SCRIPTS / ("build-initramfs" if initramfs else "fetch-kernel")
    if not script.is_file():
        raise ImageError(f"{script} is missing (native/ is not in a source checkout)")
    try:
        proc = subprocess.run(
            [str(script)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{script.name}: {exc}") from exc
    if proc.returncode != 0:
        raise ImageError(
            f"{script.name} failed with status {proc.returncode}:\n{proc.stderr.strip()}"
        )
    paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if "dir" not in paths:
        raise ImageError(f"{script.name} printed no cache entry:\n{proc.stdout}")
    return _entry(Path(paths["dir"]))
