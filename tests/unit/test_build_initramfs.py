"""deploy/images/build-initramfs reuses an archive only if its own script built it."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "images" / "build-initramfs"


def build(entry: Path, *flags: str) -> Path:
    done = subprocess.run(
        [str(SCRIPT), "--kernel-dir", str(entry), *flags],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines())
    return Path(lines["initramfs"])


@pytest.mark.parametrize("flags", [(), ("--hwvirt-l1",)], ids=["guest", "hwvirt-l1"])
def test_an_archive_another_script_rewrote_is_rebuilt(tmp_path: Path, flags: tuple[str]) -> None:
    entry = tmp_path / "6.1.0-0-cloud-amd64"
    (entry / "root" / "lib" / "modules" / entry.name).mkdir(parents=True)
    out = build(entry, *flags)
    first = out.read_bytes()
    assert b"TRAILER!!!" in gzip.decompress(first)
    assert build(entry, *flags).read_bytes() == first  # kept, and reproducible
    # A checkout of another branch shares the cache and writes its own archive.
    out.write_bytes(gzip.compress(b"another branch's archive"))
    assert build(entry, *flags).read_bytes() == first
