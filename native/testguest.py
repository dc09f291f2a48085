"""Build the test guest (native/guest/), the PVH kernel every test and benchmark boots.

``build()`` runs ``make`` only when a source under native/guest/ is newer than the
output, and is safe when several processes call it at once: each builds in its own
temporary directory and renames the result into place (atomic within one file system).
``python -m native.testguest`` builds it and prints the path.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from native import _artifacts
from native._artifacts import build_atomically, up_to_date

GUEST_DIR = Path(__file__).resolve().parent / "guest"
OUTPUT = GUEST_DIR / "build" / "guest.elf"

_SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld"}


class GuestBuildError(RuntimeError):
    """The test guest could not be built (missing tools or a failing make)."""


def _sources() -> list[Path]:
    files = [p for p in GUEST_DIR.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES]
    files.append(GUEST_DIR / "Makefile")
    return files


def build() -> Path:
    """Return the path of guest.elf, building it first when it is missing or stale.

    Raises GuestBuildError when gcc, ld or make is not installed, or when make fails
    (the message carries make's output).
    """
    if up_to_date(OUTPUT, _sources()):
        return OUTPUT
    missing = [tool for tool in ("make", "gcc", "ld") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(
            f"cannot build the test guest: {', '.join(missing)} not found on PATH "
            "(install build-essential)"
        )
    return build_atomically(
        OUTPUT,
        lambda tmp: ["make", "-s", "-C", str(GUEST_DIR), f"BUILD={tmp}", f"{tmp}/guest.elf"],
        "make failed for the test guest",
        GuestBuildError,
    )


def main() -> int:
    return _artifacts.main(build, GuestBuildError)


if __name__ == "__main__":
    sys.exit(main())
