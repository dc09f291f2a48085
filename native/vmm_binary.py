"""Build `flotilla-vmm` (native/cmd/flotilla-vmm.c): the native runtime as an executable of
its own, from the same C sources as the Python module (native/_build.py), with no
interpreter in front of it.

``build()`` compiles only when a source under native/ is newer than the output, and is safe
when several processes call it at once (each builds in a temporary directory of its own and
renames the result into place). ``python -m native.vmm_binary`` builds it and prints the
path.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from native import _artifacts
from native._artifacts import build_atomically, up_to_date

HERE = Path(__file__).resolve().parent
MAIN = HERE / "cmd" / "flotilla-vmm.c"
OUTPUT = HERE / "build" / "flotilla-vmm"
# As native/_build.py's, for the same code.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-pthread"]


class VmmBuildError(RuntimeError):
    """flotilla-vmm could not be built (no compiler, or the compiler failed)."""


def sources() -> list[Path]:
    """The runtime's sources, as the Python module's build takes them, and the main."""
    files = sorted(HERE.glob("*.c")) + sorted((HERE / "x86").glob("*.c"))
    files += sorted((HERE / "virtio").glob("*.c"))
    return [p for p in files if p.name != "_vmm.c"] + [MAIN]


def _inputs() -> list[Path]:
    headers = [*HERE.glob("*.h"), *HERE.glob("*/*.h")]
    return [*sources(), *headers]


def build() -> Path:
    """The path of flotilla-vmm, built first when it is missing or stale. Raises
    VmmBuildError when gcc is missing or fails (with its output)."""
    if up_to_date(OUTPUT, _inputs()):
        return OUTPUT
    if shutil.which("gcc") is None:
        raise VmmBuildError("cannot build flotilla-vmm: gcc not found (install build-essential)")

    def gcc(tmp: Path) -> list[str]:
        return ["gcc", *CFLAGS, f"-I{HERE}", "-o", str(tmp / OUTPUT.name), *map(str, sources())]

    return build_atomically(OUTPUT, gcc, "gcc failed for flotilla-vmm", VmmBuildError)


def main() -> int:
    return _artifacts.main(build, VmmBuildError)


if __name__ == "__main__":
    sys.exit(main())
