"""A boot file for compute nodes on the FakeDriver: it exists (the node opens it before every
start), it lies in `BOOT_DIR`, which test nodes allow (`allowed_boot_dirs`), and the fake
never reads it."""

from __future__ import annotations

from pathlib import Path

BOOT_DIR = Path(__file__).resolve().parent / "boot"
KERNEL = str(BOOT_DIR / "kernel")
