"""Claims told to the peer replicas: `claimed` (confirmed by the broker before the host is
asked, so a replica that gets the command redelivered finds it), `placed` and `released`; and
a peer's claims counted in this replica's state, so replicas deciding at once do not fill a
host twice (the compute node, which claims atomically, has the last word).

Mixed into the scheduler service (services.scheduler.service), whose state and bus it uses.
"""

from __future__ import annotations

import time

import structlog

from protos.scheduler import ClaimPhase, PlacementClaim
from services.scheduler.core import SchedulerCore
from services.scheduler.spawning import ClaimUnconfirmed
from services.scheduler.state import Claim, GroupKey

log = structlog.get_logger("flotilla.scheduler")


class Claims(SchedulerCore):
    """Announcing this replica's claims and counting its peers'; the scheduler service
    provides the rest."""

    def _placed(self, claim: Claim, claim_seq: int | None = None) -> None:
        self.state.settle(claim.domain_id, settles_at=time.time(), claim_seq=claim_seq)
        self._announce(ClaimPhase.PLACED, claim)

    def _release(self, claim: Claim) -> None:
        self.state.release(claim.domain_id)
        self._announce(ClaimPhase.RELEASED, claim)

    def _announce(self, phase: ClaimPhase, claim: Claim) -> None:
        event = claim_event(phase, self.replica, claim)
        if phase is ClaimPhase.CLAIMED:
            # Confirmed before the host is asked: a replica that gets this command redelivered
            # finds the claim once its stream has caught up (`_earlier_claim`).
            try:
                self.announce(event, confirm=True)
            except Exception as exc:
                raise ClaimUnconfirmed(f"claim on {claim.host} not confirmed: {exc}") from None
            return
        try:
            # Not waited for: peers only narrow their window with it; the compute decides.
            self.announce(event, confirm=False)
        except Exception as exc:
            log.warning("claim not announced", error=str(exc))

    def announce(self, event: PlacementClaim, *, confirm: bool) -> None:
        """Publish a claim event to the peers (the seam unit tests replace); with `confirm`,
        return only once the broker has confirmed it (raises BusError otherwise)."""
        if self.bus is None:
            return
        if confirm:
            self.bus.publish_event(event, timeout=self.config.claim_sync_timeout_s)
        else:
            self.bus.publish_event_async(event)

    def on_peer_claim(self, event: PlacementClaim, *, sent_at: float, now: float) -> None:
        if event.phase is ClaimPhase.CLAIMED:
            claim = Claim(
                domain_id=event.domain_id,
                host=event.host,
                vcpus=event.vcpus,
                memory_mib=event.memory_mib,
                group=_group_of(event),
                replica=event.replica,
                lapses_at=now + self.config.peer_claim_timeout_s,
            )
            self.state.add_claim(claim)
        elif event.phase is ClaimPhase.PLACED:
            self.state.learn(event.domain_id, event.host, _group_of(event))
            self.state.settle(event.domain_id, settles_at=sent_at, claim_seq=event.claim_seq)
        else:
            self.state.release(event.domain_id)


def claim_event(phase: ClaimPhase, replica: str, claim: Claim) -> PlacementClaim:
    """What a replica publishes about `claim` so its peers count it (and learn its group)."""
    return PlacementClaim(
        phase=phase,
        replica=replica,
        domain_id=claim.domain_id,
        host=claim.host,
        vcpus=claim.vcpus,
        memory_mib=claim.memory_mib,
        group=claim.group.name if claim.group is not None else None,
        project=claim.group.project if claim.group is not None else None,
        claim_seq=claim.claim_seq if phase is ClaimPhase.PLACED else None,
    )


def _group_of(event: PlacementClaim) -> GroupKey | None:
    # A 1.0 claim names no project: its group is kept apart from every project's.
    if event.group is None:
        return None
    return GroupKey(event.project or "", event.group)
