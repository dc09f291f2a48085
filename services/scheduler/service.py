"""The scheduler service: `ScheduleDomain` in, `Placement` (or `no_valid_host`) out.

    scheduler = Scheduler(SchedulerConfig(amqp_url=url)).start()   # consumes `scheduler`
    ...
    scheduler.stop()

Each replica keeps its own `ClusterState` from a private subscription (every replica sees
every heartbeat, domain event and peer claim); replicas compete for `ScheduleDomain` on the
shared `scheduler` queue. A decision is filter → weigh → pick → claim under the state's lock;
then the chosen compute node is asked to define and start the domain. Its own claim is atomic
(it is the final arbiter of its capacity): a refusal there is an `Attempt`, the claim is
released, the half-made definition is removed, and the next best host is tried.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import Command, DefineDomain, DestroyDomain, StartDomain, UndefineDomain
from protos.events import DomainStarted, DomainStopped, DomainUndefined
from protos.host import HostHeartbeat
from protos.replies import DomainInfo
from protos.scheduler import Attempt, ClaimPhase, Placement, PlacementClaim, ScheduleDomain
from services.bus import (
    Bus,
    BusError,
    Context,
    NoRouteError,
    RemoteError,
    RpcTimeout,
    Service,
    ServiceError,
    ServiceRunner,
    Subscription,
    handles,
)
from services.scheduler.config import SchedulerConfig
from services.scheduler.filters import build_filters
from services.scheduler.placer import Decision, Filtered, Placer
from services.scheduler.state import Claim, ClusterState, GroupKey, PlacementRequest
from services.scheduler.weights import build_weighers

log = structlog.get_logger("flotilla.scheduler")

# Compute node answers after which another host may do better. A refusal of the spec itself
# (`invalid`, `forbidden`: a bad path, a file that is no kernel) would be the same on every
# host, so it ends the placement at once and reaches the caller as it is.
RETRYABLE = frozenset({"no_capacity", "spawn_failed", "unavailable"})
SPEC_REFUSALS = frozenset({"invalid", "forbidden"})
SUBSCRIBED = (
    "host.heartbeat.*",
    "domain.started.*",
    "domain.stopped.*",
    "domain.undefined.*",
    "placement.*.*",
)
_IDS = uuid.UUID("6b1e0f8e-5c1d-4f0a-9a51-0c9b8f3c2d10")  # namespace of derived message ids


class HostRefused(Exception):
    """The chosen host did not take the domain; another may."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SchedulerService(Service):
    """Handlers only; `Scheduler` wires them to a bus. Without a bus (unit tests) the compute
    node is reached through `call`, which tests replace."""

    name = "scheduler"

    def __init__(self, config: SchedulerConfig, bus: Bus | None = None) -> None:
        self.config = config
        self.bus = bus
        self.replica = config.replica
        self.state = ClusterState(config.down_after_intervals)
        self.placer = Placer(
            self.state, build_filters(config), build_weighers(config), top_n=config.top_n
        )

    # ---- placement ---------------------------------------------------------------------------

    @handles(ScheduleDomain)
    def schedule(self, cmd: ScheduleDomain, ctx: Context) -> Placement:
        spec = cmd.spec
        structlog.contextvars.bind_contextvars(domain_id=str(spec.uuid))
        request = PlacementRequest.from_spec(spec, cmd.project)
        attempts: list[Attempt] = []
        refused: set[str] = set()
        filtered: Filtered = {}
        for _ in range(min(cmd.max_attempts, self.config.max_attempts)):
            decision = self.placer.decide(request, replica=self.replica, exclude=refused)
            filtered = decision.filtered
            if not isinstance(decision, Decision):
                break
            try:
                info = self._spawn(decision.claim, cmd, ctx.envelope.id)
            except HostRefused as exc:
                self._release(decision.claim)
                attempts.append(Attempt(host=decision.host, code=exc.code, message=exc.message))
                refused.add(decision.host)
                log.info("host refused", host=decision.host, code=exc.code, reason=exc.message)
                continue
            except BaseException:
                self._release(decision.claim)
                raise
            self._placed(decision.claim)
            log.info("placed", host=decision.host, attempts=len(attempts))
            return Placement(host=decision.host, info=info, attempts=attempts)
        raise ServiceError("no_valid_host", _why(attempts, filtered), _details(attempts, filtered))

    def _spawn(self, claim: Claim, cmd: ScheduleDomain, request_id: str) -> DomainInfo:
        """Define (and start) the domain on the claim's host; raise HostRefused if it will not,
        having removed what was left there; a non-retryable answer is raised as ServiceError."""
        host = claim.host
        self._announce(ClaimPhase.CLAIMED, claim)
        defined = False
        try:
            define = DefineDomain(spec=cmd.spec, privileged=cmd.privileged)
            info = self._call(host, define, f"{request_id}:{host}:define")
            defined = True
            if cmd.start:
                info = self._call(
                    host, StartDomain(domain_id=cmd.spec.uuid), f"{request_id}:{host}:start"
                )
            return info
        except RemoteError as exc:
            if defined:
                self._clean_up(host, cmd.spec.uuid, destroy=False)
            if exc.code in RETRYABLE:
                raise HostRefused(exc.code, exc.message) from None
            if exc.code in SPEC_REFUSALS:
                raise ServiceError(exc.code, exc.message, {**exc.details, "host": host}) from None
            raise ServiceError(
                exc.code, f"host {host}: {exc.message}", {**exc.details, "host": host}
            ) from None
        except (RpcTimeout, NoRouteError, BusError) as exc:
            # It may have run anyway: stop and remove whatever it made, best effort.
            if not isinstance(exc, NoRouteError):
                self._clean_up(host, cmd.spec.uuid, destroy=True)
            raise HostRefused("unavailable", str(exc)) from None

    def _clean_up(self, host: str, domain_id: uuid.UUID, *, destroy: bool) -> None:
        """Remove the definition a refusing host was left with (best effort: a host that does
        not answer keeps a stopped definition, which an operator can see and delete)."""
        commands: list[Command] = [UndefineDomain(domain_id=domain_id)]
        if destroy:
            commands.insert(0, DestroyDomain(domain_id=domain_id))
        for command in commands:
            try:
                self.call(routing.compute_queue(host), command, timeout=5.0, message_id=None)
            except Exception as exc:
                log.warning("clean-up failed", host=host, command=command.TYPE, error=str(exc))

    def _call(self, host: str, command: Command, key: str) -> DomainInfo:
        # Derived ids make a redelivered ScheduleDomain replay the same commands, which the
        # compute node answers from its idempotency record.
        message_id = str(uuid.uuid5(_IDS, key))
        reply = self.call(
            routing.compute_queue(host),
            command,
            timeout=self.config.compute_timeout_s,
            message_id=message_id,
        )
        assert isinstance(reply, DomainInfo), reply
        return reply

    def call(
        self, queue: str, command: Command, *, timeout: float, message_id: str | None
    ) -> Message:
        """RPC to a compute node (the seam unit tests replace)."""
        if self.bus is None:
            raise RuntimeError("SchedulerService has no bus")
        return self.bus.call(queue, command, timeout=timeout, message_id=message_id)

    def _placed(self, claim: Claim) -> None:
        self.state.settle(claim.domain_id, settles_at=time.time())
        self._announce(ClaimPhase.PLACED, claim)

    def _release(self, claim: Claim) -> None:
        self.state.release(claim.domain_id)
        self._announce(ClaimPhase.RELEASED, claim)

    def _announce(self, phase: ClaimPhase, claim: Claim) -> None:
        if self.bus is None:
            return
        event = claim_event(phase, self.replica, claim)
        try:
            # Not waited for: peers only narrow their window with it; the compute decides.
            self.bus.publish_event_async(event)
        except Exception as exc:
            log.warning("claim not announced", error=str(exc))

    # ---- what the replica hears --------------------------------------------------------------

    def on_event(self, envelope: Envelope, event: Message) -> None:
        """Everything the private subscription delivers, in order."""
        now = time.monotonic()
        if isinstance(event, HostHeartbeat):
            self.state.on_heartbeat(event, sent_at=envelope.ts, now=now)
        elif isinstance(event, DomainStarted):
            self.state.on_domain_started(event.domain_id, event.host)
        elif isinstance(event, DomainUndefined):
            self.state.on_domain_undefined(event.domain_id, event.host)
        elif isinstance(event, DomainStopped):
            pass  # still defined there: its group membership and host stand
        elif isinstance(event, PlacementClaim) and event.replica != self.replica:
            self.on_peer_claim(event, sent_at=envelope.ts, now=now)

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
            self.state.settle(event.domain_id, settles_at=sent_at)
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
    )


def _group_of(event: PlacementClaim) -> GroupKey | None:
    # A 1.0 claim names no project: its group is kept apart from every project's.
    if event.group is None:
        return None
    return GroupKey(event.project or "", event.group)


def _why(attempts: list[Attempt], filtered: Filtered) -> str:
    parts = []
    if attempts:
        tried = ", ".join(f"{a.host} ({a.code})" for a in attempts)
        parts.append(f"{len(attempts)} host(s) refused: {tried}")
    if filtered:
        removed = ", ".join(f"{name} removed {len(hosts)}" for name, hosts in filtered.items())
        parts.append(f"filters: {removed}")
    if not attempts and not filtered:
        parts.append("no compute node has sent a heartbeat")
    return "no host can take this domain: " + "; ".join(parts)


def _details(attempts: list[Attempt], filtered: Filtered) -> dict[str, Any]:
    return {"attempts": [a.model_dump() for a in attempts], "filtered": filtered}


class Scheduler:
    """One scheduler replica on a bus: the service, its runner and its private subscription."""

    def __init__(self, config: SchedulerConfig, bus: Bus | None = None) -> None:
        self.config = config
        self._own_bus = bus is None
        self.bus = bus or Bus(config.amqp_url, source=f"scheduler:{config.replica}")
        self.service = SchedulerService(config, self.bus)
        self.runner = ServiceRunner(
            self.bus,
            self.service,
            queue=routing.SCHEDULER_QUEUE,
            concurrency=config.workers,
            prefetch=config.workers,
        )
        self.subscription: Subscription | None = None

    @property
    def state(self) -> ClusterState:
        return self.service.state

    def start(self, timeout: float = 30.0) -> Scheduler:
        """Subscribe first (so host state is filling in), then serve `scheduler`."""
        if self._own_bus:
            self.bus.start(timeout)
        self.subscription = self.bus.subscribe(SUBSCRIBED, self.service.on_event, prefetch=1000)
        self.runner.start()
        log.info("scheduler serving", replica=self.config.replica)
        return self

    def wait_for_hosts(self, count: int, timeout: float = 30.0) -> None:
        """Block until at least `count` hosts have sent a heartbeat (tests, `flotilla up`)."""
        deadline = time.monotonic() + timeout
        while len(self.state.hosts) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.state.hosts)} of {count} hosts heard from")
            time.sleep(0.05)

    def stop(self) -> None:
        self.runner.stop()
        if self.subscription is not None:
            self.subscription.close()
        if self._own_bus:
            self.bus.close()
