"""Building a file from sources only when one is newer, safely when several processes build at
once: each builds in a temporary directory of its own beside the output and renames the result
into place (atomic within one file system: a reader sees the old file or the new). Used for
the test guest (native/testguest.py) and flotilla-vmm (native/vmm_binary.py)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def up_to_date(output: Path, inputs: Iterable[Path]) -> bool:
    try:
        built = output.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns <= built for src in inputs)


def build_atomically(
    output: Path, argv: Callable[[Path], list[str]], failed: str, error: type[Exception]
) -> Path:
    """Runs `argv(tmp)`, which must write `tmp / output.name`, and moves that into place.
    Raises `error` with `failed`, the exit status and the command's output when it fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=output.parent) as tmp:
        result = subprocess.run(argv(Path(tmp)), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise error(f"{failed} ({result.returncode}):\n{result.stdout}{result.stderr}")
        (Path(tmp) / output.name).replace(output)
    return output


def main(build: Callable[[], Path], error: type[Exception]) -> int:
    """A `python -m` entry point: build, print the path; the error's message and 1 if not."""
    try:
        path = build()
    except error as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0
