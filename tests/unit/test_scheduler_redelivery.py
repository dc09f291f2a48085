"""A ScheduleDomain redelivered to another replica while the first one's compute call is still
out: the placement is claimed once, on the first replica's host, whoever gets the copy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from protos import routing
from protos.base import Message
from protos.codec import envelope_for
from protos.commands import Command, DefineDomain, GetDomainInfo
from protos.scheduler import Placement, PlacementClaim, ScheduleDomain
from services.bus import ConnectionLost, Context, RemoteError, Retry
from services.scheduler.service import SchedulerService
from tests.unit.scheduler_fakes import FakeComputes, Sent, info, route, service, spec


class RecordingComputes(FakeComputes):
    """Compute nodes that answer a repeated message id from their record (a second copy waits
    for the first, as `InFlight` makes the real one do), answer GetDomainInfo, and can hold
    the first DefineDomain until `release()`."""

    def __init__(self, limits: dict[str, tuple[int, int]]) -> None:
        super().__init__(limits)
        self.answers: dict[str, Message] = {}
        self.running_ids: dict[str, threading.Lock] = {}
        self.held = threading.Event()
        self._hold = threading.Event()
        self._hold.set()

    def hold_next_define(self) -> None:
        self._hold.clear()

    def release(self) -> None:
        self._hold.set()

    def __call__(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        host = queue.removeprefix("compute.")
        if isinstance(command, GetDomainInfo):
            with self.lock:
                found = self.defined[host].get(command.domain_id)
            if found is None:
                raise RemoteError("not_found", f"{host} has no such domain")
            return info(found, host)
        if message_id is None:
            return super().__call__(queue, command, timeout=timeout, message_id=message_id)
        with self.lock:
            running = self.running_ids.setdefault(message_id, threading.Lock())
        with running:
            if message_id in self.answers:
                return self.answers[message_id]
            if isinstance(command, DefineDomain) and not self._hold.is_set():
                self.held.set()
                assert self._hold.wait(10)
            answer = super().__call__(queue, command, timeout=timeout, message_id=message_id)
            self.answers[message_id] = answer
            return answer

    def hosts_defining(self, cmd: ScheduleDomain) -> list[str]:
        with self.lock:
            return sorted(h for h, domains in self.defined.items() if cmd.spec.uuid in domains)


def replicas(
    computes: RecordingComputes,
) -> tuple[SchedulerService, SchedulerService, list[PlacementClaim]]:
    """`a` knows only h1 (so it picks h1); `b` knows both and, deciding afresh, would prefer
    the roomier h2. `a`'s claim events are returned in a list, for the test to deliver."""
    a = service(computes, replica="a", top_n=1)
    a.state.hosts.pop("h2")
    b = service(computes, replica="b", top_n=1)
    sent: list[PlacementClaim] = []

    def publish(event: PlacementClaim, *, confirm: bool) -> None:
        sent.append(event)

    a.announce = publish  # type: ignore[method-assign]
    return a, b, sent


def deliver(sent: list[PlacementClaim], to: SchedulerService) -> None:
    while sent:
        event = sent.pop(0)
        to.on_event(envelope_for(event, source=event.replica), event)


def race(
    a: SchedulerService,
    b: SchedulerService,
    computes: RecordingComputes,
    before_b: Callable[[], None],
) -> tuple[Placement, Placement]:
    """`a` takes the command and is held in its DefineDomain; then `b` gets the same delivery
    again (redelivered); then `a` is let go."""
    cmd = ScheduleDomain(spec=spec(memory_mib=1024), project="p")
    envelope = envelope_for(cmd, source="api")
    results: dict[str, Placement] = {}
    computes.hold_next_define()

    def run(svc: SchedulerService, redelivered: bool) -> None:
        results[svc.replica] = svc.schedule(cmd, Context(envelope, redelivered=redelivered))

    first = threading.Thread(target=run, args=(a, False))
    first.start()
    assert computes.held.wait(5)
    before_b()
    second = threading.Thread(target=run, args=(b, True))
    second.start()
    second.join(0.5)  # a second copy of the same call waits for the first
    computes.release()
    first.join(10)
    second.join(10)
    assert computes.hosts_defining(cmd) == ["h1"]
    return results["a"], results["b"]


LIMITS = {"h1": (8, 8192), "h2": (8, 16384)}


def test_a_redelivered_request_reuses_the_peers_claimed_host() -> None:
    computes = RecordingComputes(LIMITS)
    a, b, sent = replicas(computes)
    b.catch_up = lambda sent_at, timeout: True  # type: ignore[method-assign]
    first, second = race(a, b, computes, before_b=lambda: deliver(sent, b))
    assert first.host == second.host == "h1"
    assert first.info == second.info  # the compute node's recorded answer
    assert b.state.claims[first.info.domain_id].host == "h1"


def test_a_redelivery_ahead_of_the_peers_claim_waits_for_the_claim_stream() -> None:
    """The command and the claim events travel on different queues: the copy may reach `b`
    before `a`'s claim does. `b` catches its stream up first (here: delivers what is queued)."""
    computes = RecordingComputes(LIMITS)
    a, b, sent = replicas(computes)
    waited: list[float] = []

    def catch_up(sent_at: float, timeout: float) -> bool:
        waited.append(timeout)
        deliver(sent, b)
        return True

    b.catch_up = catch_up  # type: ignore[method-assign]
    first, second = race(a, b, computes, before_b=lambda: None)
    assert waited
    assert first.host == second.host == "h1"


def test_a_replica_that_never_saw_the_claim_asks_the_hosts() -> None:
    """`b` subscribed after the command was sent (its catch-up cannot vouch for it) and never
    heard `a`'s claim: the host that holds the definition is found by asking."""
    computes = RecordingComputes(LIMITS)
    a, b, _ = replicas(computes)
    b.catch_up = lambda sent_at, timeout: False  # type: ignore[method-assign]
    cmd = ScheduleDomain(spec=spec(memory_mib=1024), project="p")
    envelope = envelope_for(cmd, source="api")

    def define_then_die(sent: Sent) -> None:
        if not isinstance(sent.command, DefineDomain):
            raise SystemExit  # the replica dies between its define and its start

    route(a, computes, define_then_die)
    a.announce = lambda event, *, confirm: None  # type: ignore[method-assign]
    try:
        a.schedule(cmd, Context(envelope))
    except SystemExit:
        pass
    assert computes.hosts_defining(cmd) == ["h1"]
    placement = b.schedule(cmd, Context(envelope, redelivered=True))
    assert placement.host == "h1"
    assert computes.hosts_defining(cmd) == ["h1"]
    assert cmd.spec.uuid in computes.running["h1"]


def test_a_young_replica_waits_for_the_restarting_host_that_holds_the_domain() -> None:
    """`b` started after the command was sent and while `h1`'s worker was restarting, so it
    has not heard from `h1` at all; the earlier copy's define waited in `h1`'s queue. Finding
    no host (the command names `h1`), `b` must wait for `h1` to be back and go on there, not
    answer `no_valid_host` and leave the domain defined but never started."""
    computes = RecordingComputes(LIMITS)
    b = service(computes, replica="b", top_n=1, restart_wait_s=10.0)
    b.catch_up = lambda sent_at, timeout: False  # type: ignore[method-assign]
    known = b.state.hosts.pop("h1")
    cmd = ScheduleDomain(spec=spec(memory_mib=1024, host="h1"), project="p")
    envelope = envelope_for(cmd, source="api")
    # The earlier copy's define ran once the worker was back.
    computes(routing.compute_queue("h1"), DefineDomain(spec=cmd.spec), timeout=1, message_id="x")

    def back() -> None:
        time.sleep(0.3)
        with b.state.lock:
            known.seen_at = time.monotonic()
            b.state.hosts["h1"] = known  # its first heartbeat after the restart

    threading.Thread(target=back).start()
    placement = b.schedule(cmd, Context(envelope, redelivered=True))
    assert placement.host == "h1"
    assert computes.hosts_defining(cmd) == ["h1"]
    assert cmd.spec.uuid in computes.running["h1"]


@pytest.mark.parametrize("h1_heard", [True, False], ids=["h1-beating", "h1-silent-to-b"])
def test_a_call_cut_by_the_replicas_own_lost_connection_is_left_for_redelivery(
    h1_heard: bool,
) -> None:
    """`a` placed the domain on h1; a broker cut redelivered the command to `b`, which takes
    over `a`'s claim, but its replayed define fails on *b's own* lost connection. That says
    nothing about h1: b destroys nothing there, asks no other host, keeps the claim and
    hands the command back (Retry); its next copy replays the same ids and gets h1's answer.
    Whether b still hears h1's heartbeats (its subscription may be cut as well) changes
    nothing. Taken as h1 not answering, this once destroyed a's copy and started the domain
    on h2."""
    computes = RecordingComputes(LIMITS)
    a, b, sent = replicas(computes)
    b.catch_up = lambda sent_at, timeout: True  # type: ignore[method-assign]
    cmd = ScheduleDomain(spec=spec(memory_mib=1024), project="p")
    envelope = envelope_for(cmd, source="api")
    first = a.schedule(cmd, Context(envelope))
    assert first.host == "h1"
    deliver(sent, b)
    if not h1_heard:
        b.state.hosts["h1"].seen_at -= 1000.0
    link = {"up": False}
    asked: list[tuple[str, str, str | None]] = []

    def own_link(call: Sent) -> Message | None:
        asked.append((call.queue, call.command.TYPE, call.message_id))
        if not link["up"]:
            raise ConnectionLost("cannot reach the broker: StreamLostError")
        return None

    route(b, computes, own_link)
    with pytest.raises(Retry):
        b.schedule(cmd, Context(envelope, redelivered=True))
    assert asked == [(routing.compute_queue("h1"), DefineDomain.TYPE, asked[0][2])]
    assert b.state.claims[cmd.spec.uuid].host == "h1"
    assert computes.hosts_defining(cmd) == ["h1"]
    assert cmd.spec.uuid in computes.running["h1"]
    # The link is back: the next copy replays the same define (and start) on h1.
    link["up"] = True
    b.state.hosts["h1"].seen_at = time.monotonic()
    second = b.schedule(cmd, Context(envelope, redelivered=True))
    assert second.host == "h1"
    assert second.info == first.info
    assert asked[1][2] == asked[0][2]  # the same message id
    assert {queue for queue, _, _ in asked} == {routing.compute_queue("h1")}
    assert computes.hosts_defining(cmd) == ["h1"]
    assert cmd.spec.uuid not in computes.running["h2"]


def test_a_claim_the_broker_did_not_confirm_spends_no_attempt_and_is_left_for_redelivery() -> None:
    """The `claimed` announcement is confirmed before any host is asked; when this replica's
    own link cannot get it confirmed, no host was asked and none refused. The claim goes
    (`released` told to the peers) and the command goes back to the broker. Taken as the
    host's refusal, a link down for a moment burnt all five attempts at once and answered
    `no_valid_host` with room to spare on every host."""
    computes = RecordingComputes(LIMITS)
    svc = service(computes, replica="a")
    announced: list[PlacementClaim] = []
    link = {"up": False}

    def announce(event: PlacementClaim, *, confirm: bool) -> None:
        if confirm and not link["up"]:
            raise ConnectionLost("broker did not confirm within 5 s (connection down?)")
        announced.append(event)

    svc.announce = announce  # type: ignore[method-assign]
    cmd = ScheduleDomain(spec=spec(memory_mib=1024), project="p", max_attempts=5)
    envelope = envelope_for(cmd, source="api")
    for _ in range(3):
        with pytest.raises(Retry, match="not confirmed"):
            svc.schedule(cmd, Context(envelope))
    assert computes.calls == []  # no host was asked
    assert svc.state.claims == {}
    assert [(e.phase.value, e.domain_id) for e in announced] == [("released", cmd.spec.uuid)] * 3
    link["up"] = True
    placed = svc.schedule(cmd, Context(envelope, redelivered=True))
    assert placed.attempts == []
    assert computes.hosts_defining(cmd) == [placed.host]
