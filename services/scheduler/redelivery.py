"""A redelivered `ScheduleDomain` (its first replica died or lost its connection before
acking) takes over the claim an earlier copy made instead of deciding afresh, so the domain is
defined on one host whichever replica gets the copy (`Redelivery._earlier_claim`).

Mixed into the scheduler service (services.scheduler.service), whose state, placer, replica
name and compute-node seam (`call`) it uses.
"""

from __future__ import annotations

import time
import uuid

import structlog

from protos import routing
from protos.commands import GetDomainInfo
from services.bus import BusError, RemoteError
from services.scheduler.core import SchedulerCore
from services.scheduler.placer import Decision
from services.scheduler.state import Claim, PlacementRequest

log = structlog.get_logger("flotilla.scheduler")

# How often a redelivered command with no host looks again for hosts not heard from yet.
LATE_HOST_POLL_S = 0.5


class Redelivery(SchedulerCore):
    """Finding and taking over an earlier copy's claim; the scheduler service provides the
    rest."""

    def _earlier_claim(
        self, request: PlacementRequest, refused: set[str], sent_at: float
    ) -> tuple[Claim | None, bool]:
        """For a redelivered command: the claim an earlier copy of it (a peer replica that died
        or lost its connection, or this one) holds on a host not yet refused, now taken over by
        this replica, or None if there is none; and whether the claim stream covered the
        command (False: an earlier claim may exist that this replica never saw). Asking that
        host again replays the same message ids, which the compute node answers from its
        idempotency record, so the domain is not defined on a second host.

        The earlier copy's `claimed` was confirmed by the broker before it called the host, so
        once the claim stream has caught up the state holds it. When that cannot be shown (the
        barrier timed out, or this replica subscribed after the command was sent and never saw
        the claim), the alive hosts are asked whether they hold the domain."""
        covered = self.catch_up(sent_at, self.config.claim_sync_timeout_s)
        with self.state.lock:
            host = self.state.domain_host.get(request.domain_id)
        if host is None and not covered:
            log.warning("claim stream not caught up: asking the hosts")
            host = self._holder(request.domain_id, refused)
        if host is None or host in refused:
            return None, covered
        return self._take_over(request, host), covered

    def _take_over(self, request: PlacementRequest, host: str) -> Claim:
        claim = Claim(
            domain_id=request.domain_id,
            host=host,
            vcpus=request.vcpus,
            memory_mib=request.memory_mib,
            group=request.group,
            replica=self.replica,
        )
        self.state.add_claim(claim)
        log.info("redelivered: taking over the earlier claim", host=host)
        return claim

    def _late_holder(self, request: PlacementRequest) -> Claim | None:
        """A redelivered command this replica could not show an earlier claim for, and finds
        no host for: its earlier copy may have asked a host this replica has not heard from
        (it started after the command was sent, while that host's worker was restarting; the
        host's durable queue keeps the define, which runs when it is back). Until
        `restart_wait_s`, each host heard from anew is asked whether it holds the domain, and
        the decision is tried again; the claim to go on with, or None."""
        deadline = time.monotonic() + self.config.restart_wait_s
        asked = self._alive_hosts(set())  # `_holder` asked these already
        log.warning("no host for a redelivered command: waiting for hosts not heard from")
        while time.monotonic() < deadline:
            time.sleep(LATE_HOST_POLL_S)
            for host in sorted(self._alive_hosts(asked)):
                asked.add(host)
                if self._holds(host, request.domain_id):
                    return self._take_over(request, host)
            decision = self.placer.decide(request, replica=self.replica, exclude=set())
            if isinstance(decision, Decision):
                return decision.claim
        return None

    def _alive_hosts(self, besides: set[str]) -> set[str]:
        now = time.monotonic()
        with self.state.lock:
            return {
                h.name
                for h in self.state.hosts.values()
                if h.name not in besides and self.state.is_alive(h, now)
            }

    def _holder(self, domain_id: uuid.UUID, refused: set[str]) -> str | None:
        """The first alive host (not refused) that says it holds `domain_id`, if any."""
        for host in sorted(self._alive_hosts(refused)):
            if self._holds(host, domain_id):
                return host
        return None

    def _holds(self, host: str, domain_id: uuid.UUID) -> bool:
        try:
            self.call(
                routing.compute_queue(host),
                GetDomainInfo(domain_id=domain_id),
                timeout=min(5.0, self.config.compute_timeout_s),
                message_id=None,
            )
        except (RemoteError, BusError):
            return False  # not there, or no answer: nothing to reuse
        return True

    def catch_up(self, sent_at: float, timeout: float) -> bool:
        """Block until this replica's state holds every event the broker queued for it before
        the call, and say whether that covers a command sent at wall-clock `sent_at` (False
        when this replica subscribed after it, or the barrier did not come back within
        `timeout`). The seam unit tests replace."""
        if self.sync is None:
            return False
        return self.sync.wait(timeout, since=sent_at)
