"""`MigrateDomain`: choose a migration's target, claim room there, start the job on the source
(protos.migration has the whole flow).

Mixed into the scheduler service (services.scheduler.service), whose placer, state, claim
announcements and compute-node seam it uses. The decision is the placement loop's, with the
source excluded and the caller's `target` (if any) as the only host considered: the filters
still judge it, so a named target that is disabled, down or full is `no_valid_host` with the
filters' reasons, never an over-commit. The domain's size is what the source says it runs
(`GetDomainInfo`), its server group and policy those of the registry's spec; the target must
have a pool named like each host-local pool its volumes are on (`cmd.pools`, from the API).

The claim on the target is announced `claimed` before the source is asked, `placed` once the
source has the job under way, `released` when the source refuses. Until the target's first
event of the migration arrives (started or defined, detail `migrated`) or the final
`domain.migration_progress` (done: the target; failed or cancelled: the source), the domain
counts as living on its source for the group filters.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import structlog

from protos import routing
from protos.commands import GetDomainInfo
from protos.events import DomainMigrationProgress
from protos.migration import (
    FINAL_PHASES,
    MigrateDomain,
    MigrationJob,
    MigrationPhase,
    StartMigration,
)
from protos.replies import DomainInfo
from protos.scheduler import Attempt, ClaimPhase
from services.bus import (
    BusError,
    ConnectionLost,
    Context,
    NoRouteError,
    RemoteError,
    RpcTimeout,
    ServiceError,
    handles,
)
from services.scheduler.core import SchedulerCore
from services.scheduler.placer import Decision, Filtered
from services.scheduler.spawning import ClaimUnconfirmed, handed_back
from services.scheduler.state import Claim, GroupKey, PlacementRequest

log = structlog.get_logger("flotilla.scheduler")

# Source answers that are about the target (it refused what the source prepared there): the
# next best host may take the domain, unless the caller named this one.
TARGET_REFUSALS = frozenset({"no_capacity", "unavailable", "spawn_failed"})
_IDS = uuid.UUID("0c4d1a9e-2f43-4b8e-9d67-3b5f2e1a8c74")  # namespace of derived message ids


class OutcomeUnknown(Exception):
    """No answer to StartMigration (the source silent, or this replica's connection lost
    while waiting): the job may be under way."""


class TargetRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def migration_request(cmd: MigrateDomain, info: DomainInfo) -> PlacementRequest:
    """The placement request for moving the domain `info` describes: its size as the source
    runs it, its group and policy from `cmd.spec` (none without one), `cmd.target` as the only
    host (None: any)."""
    if cmd.spec is not None:
        base = PlacementRequest.from_spec(cmd.spec, cmd.project)
    else:
        base = PlacementRequest(domain_id=cmd.domain_id, vcpus=info.vcpus, memory_mib=0)
    return dataclasses.replace(
        base,
        domain_id=cmd.domain_id,
        vcpus=info.vcpus,
        memory_mib=info.memory_mib,
        forced_host=cmd.target,
        # Host-local volumes move with the domain (copied by a live migration, moved first
        # by a cold one) to the target's pool of the same name: the target must have each
        # (the `pools` filter); shared pools' volumes are attached anywhere.
        volume_hosts=frozenset(),
        pools=frozenset(cmd.pools),
    )


class MigrationHandlers(SchedulerCore):
    """The scheduler's `MigrateDomain`; the scheduler service provides the rest."""

    @handles(MigrateDomain)
    def migrate(self, cmd: MigrateDomain, ctx: Context) -> MigrationJob:
        structlog.contextvars.bind_contextvars(domain_id=str(cmd.domain_id))
        if cmd.target == cmd.source:
            raise ServiceError(
                "invalid", f"the domain is on {cmd.source} already", {"field": "host"}
            )
        info = self._source_info(cmd)
        request = migration_request(cmd, info)
        attempts: list[Attempt] = []
        refused = {cmd.source}
        filtered: Filtered = {}
        tries = 1 if cmd.target is not None else self.config.max_attempts
        for _ in range(tries):
            decision = self.placer.decide(request, replica=self.replica, exclude=refused)
            filtered = decision.filtered
            if not isinstance(decision, Decision):
                break
            claim = decision.claim
            # The claim counts the domain on the target; it lives on its source until the
            # target's first event says otherwise.
            self.state.learn(cmd.domain_id, cmd.source, request.group)
            try:
                job = self._start(cmd, claim, ctx.envelope.id)
            except TargetRefused as exc:
                self._migration_released(claim, cmd.source, request.group)
                attempts.append(Attempt(host=claim.host, code=exc.code, message=exc.message))
                refused.add(claim.host)
                log.info("target refused", target=claim.host, code=exc.code, reason=exc.message)
                continue
            except ClaimUnconfirmed as exc:
                # The source was not asked: as for a placement (service._place).
                self._migration_released(claim, cmd.source, request.group)
                log.warning("claim not confirmed: left for redelivery", target=claim.host)
                raise handed_back(str(exc)) from None
            except OutcomeUnknown as exc:
                # The claim stays (settling like a placed one): the target may be receiving.
                self.state.settle(cmd.domain_id, settles_at=time.time())
                raise ServiceError(
                    "unavailable",
                    f"source {cmd.source} did not answer in time ({exc}); the migration to "
                    f"{claim.host} may be under way: its events will tell",
                ) from None
            except BaseException:
                self._migration_released(claim, cmd.source, request.group)
                raise
            if job.phase is MigrationPhase.QUEUED:
                # It waits on its source, the target not yet prepared: the claim stands
                # (held, not settling) until the source says the job left its queue, or
                # goes down (state.Claim's `waits_on`).
                with self.state.lock:
                    claim.waits_on = cmd.source
                log.info("migration queued", source=cmd.source, target=claim.host)
                return job
            # The target took the domain at its claim count `target_claim_seq` (a live
            # migration): its first heartbeat read at that count drops the claim.
            self.state.settle(
                cmd.domain_id, settles_at=job.started_at, claim_seq=job.target_claim_seq
            )
            self._announce(ClaimPhase.PLACED, claim)
            log.info("migration started", source=cmd.source, target=claim.host)
            return job
        raise ServiceError(
            "no_valid_host",
            _why(cmd, attempts, filtered),
            {"attempts": [a.model_dump() for a in attempts], "filtered": filtered},
        )

    def _source_info(self, cmd: MigrateDomain) -> DomainInfo:
        """What the source runs; its refusal (`not_found`: it does not hold the domain) is the
        caller's answer as it is."""
        try:
            reply = self.call(
                routing.compute_queue(cmd.source),
                GetDomainInfo(domain_id=cmd.domain_id),
                timeout=self.config.compute_timeout_s,
                message_id=None,
            )
        except RemoteError as exc:
            raise ServiceError(exc.code, f"source {cmd.source}: {exc.message}") from None
        except (RpcTimeout, NoRouteError, BusError) as exc:
            raise ServiceError("unavailable", f"source {cmd.source}: {exc}") from None
        assert isinstance(reply, DomainInfo), reply
        return reply

    def _start(self, cmd: MigrateDomain, claim: Claim, request_id: str) -> MigrationJob:
        """Announce the claim, then ask the source to migrate to its host: the job under way,
        TargetRefused when the target (through the source) refused, ServiceError otherwise."""
        self._announce(ClaimPhase.CLAIMED, claim)
        command = StartMigration(domain_id=cmd.domain_id, target=claim.host, params=cmd.params)
        # Derived ids: a redelivered MigrateDomain replays the same command, which the source
        # answers from its idempotency record.
        message_id = str(uuid.uuid5(_IDS, f"{request_id}:{claim.host}:migrate"))
        try:
            reply = self.call(
                routing.compute_queue(cmd.source),
                command,
                timeout=self.config.migration_start_timeout_s,
                message_id=message_id,
            )
        except RemoteError as exc:
            if exc.code in TARGET_REFUSALS and cmd.target is None:
                raise TargetRefused(exc.code, exc.message) from None
            raise ServiceError(exc.code, exc.message, {**exc.details, "host": cmd.source}) from None
        except (RpcTimeout, ConnectionLost) as exc:
            # No answer, or this replica's own connection lost while waiting: the source may
            # have taken the command either way.
            raise OutcomeUnknown(str(exc)) from None
        except (NoRouteError, BusError) as exc:
            raise ServiceError("unavailable", f"source {cmd.source}: {exc}") from None
        assert isinstance(reply, MigrationJob), reply
        return reply

    def on_migration_progress(self, event: DomainMigrationProgress) -> None:
        """A migration's final progress says where the domain lives now: the target when it
        is done, the source otherwise (a peer's `placed` claim counted it on the target), and
        a claim still held on the target for a job that did not get there goes. A queued job
        that leaves its source's queue (`preparing`) settles the claim held for it, and the
        event that says at which claim count the target took the domain settles it on that."""
        claim = self.state.claims.get(event.domain_id)
        mine = claim is not None and claim.host == event.target and claim.replica == self.replica
        if event.phase not in FINAL_PHASES:
            # Only a job that waited announces `preparing` (one that starts at once is
            # answered started, and its claim settled by `migrate`), twice: on leaving the
            # queue, and once its target took the domain (`target_claim_seq`).
            if not mine or claim is None:
                return
            if event.target_claim_seq is not None and claim.claim_seq is None:
                self.state.settle(
                    event.domain_id, settles_at=time.time(), claim_seq=event.target_claim_seq
                )
                self._announce(ClaimPhase.PLACED, claim)
            elif claim.settles_at is None and event.phase == MigrationPhase.PREPARING:
                self.state.settle(event.domain_id, settles_at=time.time())
                self._announce(ClaimPhase.PLACED, claim)
            return
        done = event.phase == MigrationPhase.DONE and event.target
        if not done and claim is not None and claim.host == event.target:
            self.state.release(event.domain_id)
            if mine:
                self._announce(ClaimPhase.RELEASED, claim)
        self.state.on_domain_started(event.domain_id, event.target if done else event.host)

    def _migration_released(self, claim: Claim, source: str, group: GroupKey | None) -> None:
        self.state.release(claim.domain_id)
        self.state.learn(claim.domain_id, source, group)
        self._announce(ClaimPhase.RELEASED, claim)


def _why(cmd: MigrateDomain, attempts: list[Attempt], filtered: Filtered) -> str:
    parts = []
    if attempts:
        tried = ", ".join(f"{a.host} ({a.code})" for a in attempts)
        parts.append(f"{len(attempts)} target(s) refused: {tried}")
    if filtered:
        removed = ", ".join(f"{name} removed {', '.join(h)}" for name, h in filtered.items())
        parts.append(f"filters: {removed}")
    if not parts:
        parts.append(f"no compute node but {cmd.source} has sent a heartbeat")
    return f"no host can take domain {cmd.domain_id} from {cmd.source}: " + "; ".join(parts)


__all__ = ["MigrationHandlers", "migration_request"]
