"""The virtqueue parser's libFuzzer target (native/fuzz/) builds and survives a short run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parents[2] / "native" / "fuzz"


def test_virtqueue_fuzz_target_builds_and_finds_nothing_in_a_short_run(tmp_path: Path) -> None:
    if shutil.which("clang") is None or shutil.which("make") is None:
        pytest.skip("clang (with compiler-rt) and make are needed for the fuzz target")
    subprocess.run(
        ["make", "-s", "-C", str(FUZZ_DIR), f"BUILD={tmp_path}", f"{tmp_path}/virtqueue"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [str(tmp_path / "virtqueue"), "-runs=5000", "-max_len=65600", str(corpus)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 5000 runs" in result.stderr
