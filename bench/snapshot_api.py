"""Restore through the whole control plane: `POST /v1/domains/{id}/restore` to the event.

Run by bench/snapshot.py (its `snapshot.api_restore_to_event_p50`). A real stack as `flotilla
up` runs it (services.cli.stack: a private broker, the API, the scheduler and one KVM compute
node as child processes); an outside pika subscriber (bench/events.py's) bound to
`domain.started.*` and `domain.resumed.*`. The test guest, 256 MiB and 2 vCPUs, counting.

Each round, interleaved: `POST .../save` (untimed), then the client's wall clock just before
`POST .../restore` to the subscriber's receipt of that domain's `domain.started` (detail
`restored`); then `POST .../actions {"action": "pause"}` (untimed) and the same clock from
`POST .../actions {"action": "resume"}` to its `domain.resumed`: the anchor, the control
plane's floor (one RPC to the host, one VMM control request, one event) in the same rounds.
Hops from the same samples, each from the request: to the VMM's journal stamp (`ts` of its
`started`/`resumed` record: API, RPC, worker, the VMM's start and restore), to the event's
envelope `ts` (made in the compute node's store transaction), to the API's answer and to the
subscriber's receipt.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.events import Subscriber
from compute_node.vmm.client import read_journal
from compute_node.vmm.frames import JOURNAL
from protos import routing
from protos.codec import decode
from services.broker import free_port
from services.cli.stack import ComputeSpec, Stack, StackConfig

ROUNDS = 15
WARMUP = 2
MEMORY_MIB = 256
VCPUS = 2
CMDLINE = "ready memtest=32 counter"
KEYS = ("domain.started.*", "domain.resumed.*")


@dataclass
class Samples:
    """Milliseconds a round, by name: `restore`/`resume` (request to receipt), `*_answer`
    (request to the API's 200), `*_made` (request to the envelope's ts)."""

    ms: dict[str, list[float]] = field(default_factory=dict)
    warm: int = 0  # restores whose VMM began as a warm spare

    def add(self, name: str, value: float) -> None:
        self.ms.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.ms[name])


def _post(client: httpx.Client, path: str, body: dict[str, object] | None = None) -> float:
    """POST, checked; returns the wall clock at the answer."""
    r = client.post(path, json=body)
    if r.status_code not in (200, 201, 202):
        raise SystemExit(f"bench/snapshot_api: {path}: {r.status_code} {r.text}")
    return time.time()


def _timed(
    client: httpx.Client,
    sub: Subscriber,
    path: str,
    *,
    body: dict[str, object] | None,
    key: str,
    detail: str,
) -> tuple[float, float, float, float]:
    """Wall clocks (request, receipt, answer, envelope ts) of the first event on `key` with
    `detail` after the request."""
    mark = len(sub.got)
    t0 = time.time()
    answered = _post(client, path, body)
    at = mark
    while True:
        received, raw, at = sub.wait(key, at)
        envelope = decode(raw)
        if envelope.body.get("detail") == detail:
            return t0, received, answered, envelope.ts
        at += 1


def _stamp(journal: Path, kind: str) -> float:
    """The VMM's wall-clock stamp of its newest `kind` journal record."""
    return next(r["ts"] for r in reversed(read_journal(journal)) if r["kind"] == kind)


def _sample(out: Samples, verb: str, times: tuple[float, float, float, float], vmm: float) -> None:
    t0, received, answered, made = times
    out.add(verb, (received - t0) * 1e3)
    out.add(f"{verb}_answer", (answered - t0) * 1e3)
    out.add(f"{verb}_vmm", (vmm - t0) * 1e3)
    out.add(f"{verb}_made", (made - t0) * 1e3)


def _began_warm(domain_dir: Path) -> bool:
    """Whether the domain's VMM started as a warm spare (its command line says `--spare`)."""
    try:
        pid = int((domain_dir / "vmm.pid").read_text())
        return b"--spare" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False


def _round(
    client: httpx.Client, sub: Subscriber, domain_id: str, journal: Path, out: Samples
) -> None:
    base = f"/v1/domains/{domain_id}"
    _post(client, f"{base}/save")
    key = routing.event_key("domain", "started", domain_id)
    times = _timed(client, sub, f"{base}/restore", body=None, key=key, detail="restored")
    _sample(out, "restore", times, _stamp(journal, "started"))
    out.warm += _began_warm(journal.parent)
    time.sleep(0.05)  # the guest counts again
    _post(client, f"{base}/actions", {"action": "pause"})
    key = routing.event_key("domain", "resumed", domain_id)
    resume: dict[str, object] = {"action": "resume"}
    times = _timed(client, sub, f"{base}/actions", body=resume, key=key, detail="unpaused")
    _sample(out, "resume", times, _stamp(journal, "resumed"))
    time.sleep(0.05)


def measure(guest: Path, rounds: int = ROUNDS, warm_vmms: int | None = None) -> Samples:
    """`rounds` interleaved restore and resume samples on a stack of its own (its compute
    node's `warm_vmms` if given, else its default)."""
    settings = {} if warm_vmms is None else {"warm_vmms": warm_vmms}
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-api-") as tmp:
        stack = Stack(
            StackConfig(
                state_dir=Path(tmp) / "state",
                listen_port=free_port(),
                computes=[ComputeSpec(socket.gethostname().split(".")[0], settings)],
            )
        )
        stack.start(timeout=120)
        try:
            sub = Subscriber(stack.amqp_url, KEYS)
            headers = {"Authorization": f"Bearer {stack.admin_token}"}
            with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as client:
                r = client.post(
                    "/v1/domains",
                    json={
                        "name": f"bench-restore-{uuid.uuid4().hex[:8]}",
                        "memory_mib": MEMORY_MIB,
                        "vcpus": VCPUS,
                        "boot": {"kernel": str(guest), "cmdline": CMDLINE},
                    },
                )
                if r.status_code != 201:
                    raise SystemExit(f"bench/snapshot_api: create: {r.status_code} {r.text}")
                domain_id = r.json()["id"]
                host = stack.computes_spec[0].host
                journal = stack.state_dir / "compute" / host / "domains" / domain_id / JOURNAL
                time.sleep(0.5)  # memtest done, counting
                for _ in range(WARMUP):
                    _round(client, sub, domain_id, journal, Samples())
                out = Samples()
                for _ in range(rounds):
                    _round(client, sub, domain_id, journal, out)
            sub.close()
        finally:
            stack.stop()
    return out


def compare(runs: int) -> None:
    """`runs` stacks alternating warm_vmms 0 and 1; each run's medians."""
    from bench.figures import say
    from native import testguest

    guest = testguest.build()
    for n in range(runs):
        warm = n % 2
        with open("/proc/loadavg") as f:  # noqa: PTH123
            load = f.read().split()[0]
        out = measure(guest, warm_vmms=warm)
        say(
            f"warm_vmms={warm} (load {load}): restore {out.median('restore'):.1f} ms "
            f"(→VMM stamp {out.median('restore_vmm'):.1f}), resume {out.median('resume'):.1f} ms, "
            f"ratio {out.median('restore') / out.median('resume'):.2f}, "
            f"{out.warm}/{len(out.ms['restore'])} restores on a spare"
        )


if __name__ == "__main__":
    import sys

    compare(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
