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
import subprocess
import sys
import tempfile
from pathlib import Path

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


def _up_to_date() -> bool:
    try:
        built = OUTPUT.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns <= built for src in _inputs())


def build() -> Path:
    """The path of flotilla-vmm, built first when it is missing or stale. Raises
    VmmBuildError when gcc is missing or fails (with its output)."""
    if _up_to_date():
        return OUTPUT
    if shutil.which("gcc") is None:
        raise VmmBuildError("cannot build flotilla-vmm: gcc not found (install build-essential)")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=OUTPUT.parent) as tmp:
        out = Path(tmp) / "flotilla-vmm"
        argv = ["gcc", *CFLAGS, f"-I{HERE}", "-o", str(out), *map(str, sources())]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise VmmBuildError(
                f"gcc failed for flotilla-vmm ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        out.replace(OUTPUT)
    return OUTPUT


def main() -> int:
    try:
        path = build()
    except VmmBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
