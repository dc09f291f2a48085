"""storage.upload_mbps: a volume uploaded through the API, against `cp` of the same file.

    python bench/storage_upload.py

Starts the stack on one host (`flotilla up`'s Stack: a private broker, the API, the
scheduler, the storage service, one compute node on the fake driver, whose `default` pool is
a directory under TMPDIR), makes a file of SIZE bytes of random data beside the pool, then
times, in interleaved rounds:
- the upload through the API: `POST /v1/volumes/upload` streaming the file in 1 MiB chunks
  over HTTP (loopback) to the API, which frames it to the compute node's transfer port,
  where the file layer hashes it, writes a temp file, `fdatasync`s and links it — the figure
  (the volume is deleted after each round, outside the timing);
- the anchor: `cp --reflink=never` of the same file into the same file system, then
  `sync -f` (equally durable).
Medians of ROUNDS rounds; human-readable results on stderr, JSON figures last.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.brokers import broker_url, have_broker  # noqa: E402
from bench.figures import emit, figure, say  # noqa: E402
from services.broker import free_port  # noqa: E402
from services.cli.stack import Stack, StackConfig  # noqa: E402

MiB = 1 << 20
SIZE = 256 * MiB
ROUNDS = 5


def chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            yield chunk


def through_api(client: httpx.Client, source: Path, name: str) -> str:
    reply = client.post(
        "/v1/volumes/upload",
        params={"name": name},
        content=chunks(source),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(SIZE)},
        timeout=600,
    )
    reply.raise_for_status()
    volume_id: str = reply.json()["id"]
    return volume_id


def cp(source: Path, dest: Path) -> None:
    subprocess.run(["cp", "--reflink=never", str(source), str(dest)], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)


def main() -> int:
    result = measure()
    if result is None:
        return 2
    emit([result])
    return 0


def measure() -> dict[str, object] | None:
    """The storage.upload_mbps figure (results on stderr); None without a broker."""
    if not have_broker():
        say("no broker: set FLOTILLA_AMQP_URL or `apt-get install -y rabbitmq-server`")
        return None
    with (
        tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp,
        broker_url(Path(tmp), "flotilla-bench-upload", start_timeout=300) as amqp_url,
    ):
        state = Path(tmp) / "state"
        stack = Stack(
            StackConfig(state_dir=state, amqp_url=amqp_url, listen_port=free_port(), driver="fake")
        )
        say("starting the stack (API, scheduler, storage service, one compute node)")
        stack.start(timeout=300)
        try:
            source = Path(tmp) / "source.raw"
            block = os.urandom(MiB)
            with source.open("wb") as f:
                for _ in range(SIZE // MiB):
                    f.write(block)
            client = httpx.Client(
                base_url=stack.api_url,
                headers={"Authorization": f"Bearer {stack.admin_token}"},
                timeout=60,
            )
            mibps: dict[str, list[float]] = {"api": [], "cp": []}
            for i in range(ROUNDS):
                subprocess.run(["sync", "-f", tmp], check=True)
                started = time.perf_counter()
                volume_id = through_api(client, source, f"bench-{i}")
                mibps["api"].append(SIZE / MiB / (time.perf_counter() - started))
                client.delete(f"/v1/volumes/{volume_id}").raise_for_status()
                subprocess.run(["sync", "-f", tmp], check=True)
                copy = Path(tmp) / "copy.raw"
                started = time.perf_counter()
                cp(source, copy)
                mibps["cp"].append(SIZE / MiB / (time.perf_counter() - started))
                copy.unlink()
            client.close()
        finally:
            stack.stop()
    med = {k: statistics.median(v) for k, v in mibps.items()}
    say(f"storage.upload_mbps ({SIZE // MiB} MiB of random data, {ROUNDS} rounds, medians)")
    for name, label in (("api", "POST /v1/volumes/upload"), ("cp", "cp --reflink=never + sync")):
        values = mibps[name]
        say(f"  {label:28s} {med[name]:8.1f} MiB/s  (min {min(values):.1f}, max {max(values):.1f})")
    return figure(
        "storage.upload_mbps",
        med["api"],
        "MiB/s",
        anchor="cp --reflink=never + sync of the same file",
        anchor_value=med["cp"],
        target="report",
        size_mib=SIZE // MiB,
    )


if __name__ == "__main__":
    raise SystemExit(main())
