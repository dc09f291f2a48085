"""The libFuzzer targets of native/fuzz/ build, reach the code they drive from their seeds,
survive a short run, and pass every regression input kept from an earlier finding."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ_DIR = ROOT / "native" / "fuzz"
REGRESSIONS = FUZZ_DIR / "regressions"
RUNS = 3000

# Edges each target's seeds alone reach (a floor somewhat below what they reach today): a
# harness that stops getting past the driver handshake or the image header fails here.
MIN_SEED_EDGES = {
    "virtqueue": 40,
    "image": 110,
    "virtio_blk": 170,
    "virtio_net": 160,
    "virtio_mmio": 200,
    "serial": 60,
    "ports": 90,
    "ioapic": 100,
    "snapshot": 60,
    "migrate": 70,
}


@pytest.fixture(scope="module")
def fuzz_build() -> Path:
    """Builds every target and its seeds once, incrementally, under build/fuzz."""
    if shutil.which("clang") is None or shutil.which("make") is None:
        pytest.skip("clang (with compiler-rt) and make are needed for the fuzz targets")
    build = ROOT / "build" / "fuzz"
    subprocess.run(
        ["make", "-s", "-j2", "-C", str(FUZZ_DIR), f"BUILD={build}", f"PYTHON={sys.executable}"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return build


def libfuzzer_args(target: str) -> list[str]:
    """The input size limit and dictionary `make run-<target>` fuzzes with."""
    return subprocess.run(
        ["make", "-s", "-C", str(FUZZ_DIR), f"args-{target}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()


@pytest.mark.parametrize("target", sorted(MIN_SEED_EDGES))
def test_fuzz_target_reaches_its_code_and_finds_nothing_in_a_short_run(
    fuzz_build: Path, target: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            str(fuzz_build / target),
            f"-runs={RUNS}",
            "-seed=1",
            *libfuzzer_args(target),
            str(corpus),
            str(fuzz_build / "seeds" / target),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {RUNS} runs" in result.stderr
    inited = re.search(r"INITED cov: (\d+)", result.stderr)
    assert inited is not None, result.stderr[-2000:]
    assert int(inited.group(1)) >= MIN_SEED_EDGES[target]


@pytest.mark.parametrize(
    "finding",
    sorted(REGRESSIONS.glob("*/*")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_kept_regression_input_passes(fuzz_build: Path, finding: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(fuzz_build / finding.parent.name), str(finding)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
