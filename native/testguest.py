"""Build the test guest (native/guest/), the PVH kernel every test and benchmark boots.

``build()`` runs ``make`` only when a source under native/guest/ is newer than the
output, and is safe when several processes call it at once: each builds in its own
temporary directory and renames the result into place (atomic within one file system).
``python -m native.testguest`` builds it and prints the path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent / "guest"
OUTPUT = GUEST_DIR / "build" / "guest.elf"

_SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld"}


class GuestBuildError(RuntimeError):
    """The test guest could not be built (missing tools or a failing make)."""


def _sources() -> list[Path]:
    files = [p for p in GUEST_DIR.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES]
    files.append(GUEST_DIR / "Makefile")
    return files


def _up_to_date() -> bool:
    try:
        built = OUTPUT.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns <= built for src in _sources())


def build() -> Path:
    """Return the path of guest.elf, building it first when it is missing or stale.

    Raises GuestBuildError when gcc, ld or make is not installed, or when make fails
    (the message carries make's output).
    """
    if _up_to_date():
        return OUTPUT
    missing = [tool for tool in ("make", "gcc", "ld") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(
            f"cannot build the test guest: {', '.join(missing)} not found on PATH "
            "(install build-essential)"
        )
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=OUTPUT.parent) as tmp:
        result = subprocess.run(
            ["make", "-s", "-C", str(GUEST_DIR), f"BUILD={tmp}", f"{tmp}/guest.elf"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise GuestBuildError(
                f"make failed for the test guest ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        # Atomic on one file system: a concurrent reader sees the old file or the new.
        (Path(tmp) / "guest.elf").replace(OUTPUT)
    return OUTPUT


def main() -> int:
    try:
        path = build()
    except GuestBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
