"""What must hold after a chaos run, checked from four independent places: the registry (the
API), the hosts (`ListDomains` on each `compute.<host>`), `ps` (VMM processes, domain dirs)
and an event subscriber of our own on a quorum queue. Each violation is a line of evidence."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import ListDomains
from protos.events import DomainEvent
from protos.replies import DomainList
from services.bus import Bus
from tests.chaos.faults import vmm_pids
from tests.chaos.rig import Rig
from tests.chaos.workload import UNKNOWN, Outcome, Workload

# Refusals a client may get while faults are injected; each says why (a problem `code`).
REPORTED = frozenset({404, 409, 503, 504})
TASKS_UNDER_WAY = frozenset({"scheduling", "building", "migrating", "deleting"})


@dataclass(frozen=True)
class Seen:
    seq: int
    type: str
    detail: str
    reason: str
    state: str
    id: str


@dataclass
class Watcher:
    """Every domain event, on a quorum queue of its own (replicated on every broker node)."""

    bus: Bus
    events: defaultdict[tuple[str, str], list[Seen]] = field(
        default_factory=lambda: defaultdict(list)
    )
    ids: set[str] = field(default_factory=set)
    duplicates: int = 0  # the same message id again: at-least-once, dropped here
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Watcher:
        queue = f"chaos-watch-{uuid.uuid4().hex[:8]}"
        self.subscription = self.bus.subscribe(["domain.#"], self._on_event, queue=queue)
        return self

    def _on_event(self, envelope: Envelope, event: Message) -> None:
        if not isinstance(event, DomainEvent):
            return
        seen = Seen(
            event.seq,
            event.TYPE,
            str(getattr(event, "detail", "")),
            event.reason,
            event.state.value,
            envelope.id,
        )
        with self._lock:
            if envelope.id in self.ids:
                self.duplicates += 1
                return
            self.ids.add(envelope.id)
            self.events[(str(event.domain_id), event.host)].append(seen)

    def count(self) -> int:
        with self._lock:
            return len(self.ids)

    def quiet(self, for_s: float = 3.0, timeout: float = 60.0) -> None:
        """Wait until no new event came for `for_s` (events still in flight arrive)."""
        deadline = time.monotonic() + timeout
        last, since = self.count(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < for_s:
            time.sleep(0.2)
            if (n := self.count()) != last:
                last, since = n, time.monotonic()

    def of(self, domain_id: str) -> dict[str, list[Seen]]:
        """The domain's events per host, by seq."""
        with self._lock:
            return {
                host: sorted(evs, key=lambda s: s.seq)
                for (d, host), evs in self.events.items()
                if d == domain_id
            }

    def close(self) -> None:
        self.subscription.close()


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    # Violations of a known product bug, set aside by `set_aside` (none is known now).
    known: list[str] = field(default_factory=list)
    figures: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)  # "op status code" → how many
    waits: list[str] = field(default_factory=list)  # the clients' waits that ran out

    def fail(self, text: str) -> None:
        self.violations.append(text)

    def set_aside(self, markers: set[str], why: str) -> None:
        """Move the violations that name any of `markers` to `known`."""
        keep = []
        for text in self.violations:
            if any(m in text for m in markers):
                self.known.append(f"{why}: {text}")
            else:
                keep.append(text)
        self.violations = keep


def check(rig: Rig, workload: Workload, watcher: Watcher, bus: Bus) -> Report:
    report = Report(waits=list(workload.waits))
    for error in workload.errors:
        report.fail(error)
    watcher.quiet()
    _registry(rig, report)
    _hosts(rig, bus, report)
    _processes(rig, report)
    for text in _answers(workload, watcher):
        report.fail(text)
    for domain_id in sorted(set(workload.names.values())):
        for text in _events(domain_id, watcher.of(domain_id), workload):
            report.fail(text)
    by_status = Counter(o.status for o in workload.outcomes)
    report.refusals = dict(
        Counter(f"{o.op} {o.status} {o.code}" for o in workload.outcomes if o.status >= 300)
    )
    report.figures = {
        "commands": len(workload.outcomes),
        "accepted": sum(n for s, n in by_status.items() if 200 <= s < 300),
        "refused": sum(n for s, n in by_status.items() if s >= 400),
        "unknown_outcome": by_status.get(UNKNOWN, 0),
        "domains": len(set(workload.names.values())),
        "events": watcher.count(),
        "events_republished": watcher.duplicates,
        "violations": len(report.violations),
        "known_bug_violations": len(report.known),
    }
    return report


def _registry(rig: Rig, report: Report) -> None:
    """Every client deleted its guests: the registry must hold none, and none stuck."""
    deadline = time.monotonic() + 60
    left: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{rig.api_urls[0]}/v1/domains", headers=rig.auth(), timeout=30)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        left = r.json().get("domains", []) if r.status_code == 200 else [{"status": r.status_code}]
        if not left:
            return
        time.sleep(0.5)
    for d in left:
        stuck = d.get("task") in TASKS_UNDER_WAY
        report.fail(
            f"registry: {d.get('name')} ({d.get('id')}) left "
            f"{'stuck in task ' if stuck else ''}{d.get('task')}, state {d.get('state')}, "
            f"fault {d.get('fault')}"
        )


def _hosts(rig: Rig, bus: Bus, report: Report) -> None:
    for compute in rig.computes:
        try:
            reply = bus.call(routing.compute_queue(compute.host), ListDomains(), timeout=30)
        except Exception as exc:
            report.fail(f"host {compute.host}: ListDomains failed: {exc}")
            continue
        assert isinstance(reply, DomainList)
        for d in reply.domains:
            report.fail(f"host {compute.host} still holds {d.name} ({d.domain_id}) {d.state}")


def _processes(rig: Rig, report: Report) -> None:
    for pid, cwd in vmm_pids(rig.base).items():
        report.fail(f"ps: orphan VMM pid {pid} in {cwd}")
    for compute in rig.computes:
        for domain_dir in compute.state_dir.glob("domains/*"):
            report.fail(f"orphan domain dir {domain_dir}")


def _answers(workload: Workload, watcher: Watcher) -> list[str]:
    """No accepted request without its effect; every refusal a reported one."""
    found: list[str] = []
    for o in workload.outcomes:
        what = f"{o.op} {o.name} ({o.domain_id}) -> {o.status} {o.code}"
        if o.status == UNKNOWN:
            continue
        if o.status >= 300 and (o.status not in REPORTED or not o.code):
            found.append(f"answer: {what}: not a reported failure")
            continue
        if o.status >= 300 or o.domain_id is None:
            continue
        per_host = watcher.of(o.domain_id)
        events = per_host.get(o.host or "", [])
        if o.op == "create" and o.state == "running":
            if not any(e.type == "domain.started" for e in events):
                found.append(f"answer: {what} on {o.host}, but no domain.started from it")
        elif o.op in ("start", "destroy") and o.seq is not None:
            want = {"start": "domain.started", "destroy": "domain.stopped"}[o.op]
            if not any(e.type == want and e.seq <= o.seq for e in events):
                found.append(f"answer: {what} seq {o.seq}, but no {want} up to it: {events}")
        elif (
            o.op == "delete"
            and o.status == 202
            and per_host  # a domain deleted before it reached any host has no events
            and not any(e.type == "domain.undefined" for evs in per_host.values() for e in evs)
        ):
            found.append(f"answer: {what}, but no domain.undefined")
    return found


def _requests(workload: Workload, domain_id: str) -> list[Outcome]:
    return [o for o in workload.outcomes if o.domain_id == domain_id]


def _events(domain_id: str, per_host: dict[str, list[Seen]], workload: Workload) -> list[str]:
    """Per host: seq 1..n without gap or duplicate; starts and stops alternate (no effect
    twice); every stop is a destroy asked for, or says why; the domain ends undefined."""
    found: list[str] = []
    asked = [o for o in _requests(workload, domain_id) if o.op in ("destroy", "delete")]
    destroys = 0
    for host, events in per_host.items():
        seqs = [e.seq for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            found.append(f"events: {domain_id} on {host}: seq {seqs} (gap or duplicate)")
        running = False
        for e in events:
            if e.type == "domain.started":
                if running:
                    found.append(f"events: {domain_id} on {host}: started twice at seq {e.seq}")
                running = True
            elif e.type == "domain.stopped":
                if not running:
                    found.append(f"events: {domain_id} on {host}: stopped twice at seq {e.seq}")
                running = False
                if e.detail == "destroyed":
                    destroys += 1
                elif not e.reason:
                    found.append(f"events: {domain_id} on {host}: stopped ({e.detail}) w/o reason")
        if events and events[-1].type != "domain.undefined":
            found.append(f"events: {domain_id} on {host}: ends with {events[-1]}, not undefined")
    # The scheduler's cleanup of an abandoned attempt destroys too; it is not a client's.
    cleanups = max(0, len(per_host) - 1)
    if destroys > len(asked) + cleanups:
        found.append(
            f"events: {domain_id}: {destroys} destroyed stops for {len(asked)} destroy/delete "
            f"requests: {[(o.op, o.status, o.code) for o in asked]}"
        )
    return found
