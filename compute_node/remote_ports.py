"""The other hosts' ports this host must know (l2population), routed by network.

Port events reach a host's durable queue `compute.<host>.ports` only for the networks it
carries: the network service routes each one by `netport.<event>.<network>` too (a BCC key),
and the queue is bound to `netport.*.<network>` when the host first carries a network and
unbound when its last port there goes. So a host without a network hears nothing of it.

What the queue cannot hold -- ports bound before the binding was made (a host started late,
a network new to this host), or while a binding was lost -- the node asks the network
service (`ListBoundPorts`): right after each binding, at start, and after each reconnection.
Answers and events are merged by each port's `seq` (`HostNetworks.learn`). The questions run
on a thread of their own, started when a guest's start first applies a network, so they
overlap its plumbing; the start waits for the answer only at its end, and only so long
(`networks.ANSWER_WAIT_S`): a network service that does not answer is asked again, with
backoff, until it does, and its answer is pushed when it comes.
"""

from __future__ import annotations

import threading
import time
import uuid

import structlog

from compute_node.networks import (
    LEGACY_PORT_PATTERNS,
    Answer,
    AnswerWait,
    HostNetworks,
    ports_queue,
)
from protos import routing
from protos.network import BoundPorts, ListBoundPorts
from services.bus import Bus, Subscription

log = structlog.get_logger("flotilla.compute.remote_ports")
ASK_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0


def patterns(network_ids: frozenset[str]) -> list[str]:
    return [routing.network_ports_pattern(n) for n in sorted(network_ids)]


class RemotePorts:
    """Keeps the port queue bound to the carried networks and asks for what it missed."""

    def __init__(self, bus: Bus, host: str, networks: HostNetworks) -> None:
        self._bus = bus
        self._host = host
        self._networks = networks
        self._cond = threading.Condition()
        self._want: frozenset[str] = frozenset()  # what the host carries
        self._bound: frozenset[str] = frozenset()  # what the queue is bound by
        self._ask: set[str] = set()  # networks to ask about
        self._answers: dict[str, Answer] = {}  # the latest answer about each bound network
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="remote-ports", daemon=True)
        self.subscription: Subscription | None = None
        self.asked = 0  # answers received (tests wait on it)

    def start(self) -> RemotePorts:
        """Bind the queue to the carried networks (unbinding an older release's catch-all
        patterns), consume it, ask about every carried network, and follow changes."""
        carried = self._networks.carried()
        self.subscription = self._bus.subscribe(
            patterns(carried), self._networks.on_port_event, queue=ports_queue(self._host)
        )
        self.subscription.rebind(patterns(carried), unbind=LEGACY_PORT_PATTERNS)
        with self._cond:
            self._want = self._bound = carried
            self._ask |= carried
        self._networks.carried_changed = self.carry
        self._bus.link.disconnect_listeners.append(self._disconnected)
        self._thread.start()
        return self

    def carry(self, network_ids: frozenset[str]) -> AnswerWait:
        """The host carries exactly `network_ids` now (from the plumbing thread); returns a
        wait for the answer about those new to it (None: not within the timeout)."""
        with self._cond:
            new = network_ids - self._want
            self._want = network_ids
            for gone in self._bound - network_ids:
                self._answers.pop(gone, None)
            self._cond.notify_all()

        def wait(timeout: float) -> Answer | None:
            with self._cond:
                if not self._cond.wait_for(
                    lambda: self._stopping or new <= self._answers.keys(), timeout
                ):
                    return None
                if self._stopping:
                    return None
                answers = list({id(a): a for a in (self._answers[n] for n in new)}.values())
            # One question covers every network new at once; several are merged.
            ids = frozenset[str]().union(*(a[0] for a in answers))
            ports = [p for a in answers for p in a[1]]
            return ids, ports, min(a[2] for a in answers)

        return wait

    def _disconnected(self) -> None:
        # The queue kept its events, but what the service knows may have moved meanwhile.
        with self._cond:
            self._ask |= self._bound
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(10)
        if self.subscription is not None:
            self.subscription.close()

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._cond:
                while not self._stopping and self._want == self._bound and not self._ask:
                    self._cond.wait()
                if self._stopping:
                    return
                want = self._want
            try:
                if want != self._bound:
                    self._rebind(want)
                if self._ask:
                    self._ask_service()
            except Exception as exc:  # broker or network service away: again, later
                log.warning("remote ports not synced", error=str(exc), retry_in_s=backoff)
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            else:
                backoff = 0.1

    def _rebind(self, want: frozenset[str]) -> None:
        assert self.subscription is not None
        start = time.perf_counter()
        self.subscription.rebind(patterns(want))
        log.info("port queue rebound", ms=round((time.perf_counter() - start) * 1e3, 2))
        with self._cond:
            self._ask |= want - self._bound
            self._ask -= self._bound - want
            self._bound = want

    def _ask_service(self) -> None:
        with self._cond:
            ask = frozenset(self._ask & self._bound)
            self._ask -= ask
        if not ask:
            return
        tick = self._networks.tick
        start = time.perf_counter()
        try:
            reply = self._bus.call(
                routing.NETWORK_QUEUE,
                ListBoundPorts(network_ids=[uuid.UUID(n) for n in sorted(ask)]),
                timeout=ASK_TIMEOUT_S,
            )
        except BaseException:
            with self._cond:
                self._ask |= ask
            raise
        assert isinstance(reply, BoundPorts)
        answer = (ask, list(reply.ports), tick)
        with self._cond:
            for network_id in ask & self._want:
                self._answers[network_id] = answer
            self._cond.notify_all()
        # Not waited for: the plumbing thread may be waiting for this very answer.
        self._networks.learn(*answer)
        self.asked += 1
        log.info(
            "remote ports learned",
            networks=len(ask),
            ports=len(reply.ports),
            ask_ms=round((time.perf_counter() - start) * 1e3, 2),
        )
