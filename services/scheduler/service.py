"""The scheduler service: `ScheduleDomain` in, `Placement` (or `no_valid_host`) out;
`MigrateDomain` in, the source's `MigrationJob` out (services.scheduler.migration).

    scheduler = Scheduler(SchedulerConfig(amqp_url=url)).start()   # consumes `scheduler`
    ...
    scheduler.stop()

Each replica keeps its own `ClusterState` from a private subscription (every replica sees
every heartbeat, domain event and peer claim); replicas compete for `ScheduleDomain` on the
shared `scheduler` queue. A decision is filter → weigh → pick → claim under the state's lock;
then the chosen compute node is asked to define and start the domain. Its own claim is atomic
(it is the final arbiter of its capacity): a refusal there is an `Attempt`, the claim is
released, the half-made definition is removed, and the next best host is tried.

The rest of a placement is mixed in, one concern a module: a redelivered command taking over
its earlier copy's claim (services.scheduler.redelivery), claims told to and heard from the
peer replicas (services.scheduler.claims), the domain's ports (services.scheduler.ports), and
the chosen host's define and start with the clean-up after a refusal or a slow start
(services.scheduler.spawning).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from protos import routing
from protos.base import Message
from protos.bindings import PortBinding
from protos.codec import Envelope
from protos.commands import Command
from protos.events import (
    DefinedDetail,
    DomainDefined,
    DomainMigrationProgress,
    DomainStarted,
    DomainStopped,
    DomainUndefined,
)
from protos.host import HostHeartbeat
from protos.scheduler import Attempt, Placement, PlacementClaim, PlacementSync, ScheduleDomain
from services.bus import (
    Bus,
    Context,
    Service,
    ServiceError,
    ServiceRunner,
    Subscription,
    handles,
)
from services.scheduler.catch_up import CatchUp
from services.scheduler.claims import Claims
from services.scheduler.config import SchedulerConfig
from services.scheduler.filters import build_filters
from services.scheduler.migration import MigrationHandlers
from services.scheduler.placer import Decision, Filtered, Placer
from services.scheduler.ports import Ports
from services.scheduler.redelivery import Redelivery
from services.scheduler.spawning import (
    ClaimUnconfirmed,
    HostInDoubt,
    HostRefused,
    LinkLost,
    Spawning,
    handed_back,
)
from services.scheduler.state import Claim, ClusterState, PlacementRequest
from services.scheduler.weights import build_weighers

log = structlog.get_logger("flotilla.scheduler")

SUBSCRIBED = (
    "host.heartbeat.*",
    "domain.started.*",
    "domain.defined.*",  # a cold migration's arrival (detail migrated)
    "domain.migration_progress.*",  # a migration's end: where the domain lives now
    "domain.stopped.*",
    "domain.undefined.*",
    "placement.*.*",
)


class SchedulerService(Redelivery, Claims, Ports, Spawning, MigrationHandlers, Service):
    """Handlers only; `Scheduler` wires them to a bus. Without a bus (unit tests) the compute
    node is reached through `call`, which tests replace."""

    name = "scheduler"

    def __init__(self, config: SchedulerConfig, bus: Bus | None = None) -> None:
        self.config = config
        self.bus = bus
        self.replica = config.replica
        self.state = ClusterState(config.down_after_intervals, config.silence_grace_intervals)
        self.placer = Placer(
            self.state, build_filters(config), build_weighers(config), top_n=config.top_n
        )
        self.sync = CatchUp(bus, config.replica) if bus is not None else None

    # ---- placement ---------------------------------------------------------------------------

    @handles(ScheduleDomain)
    def schedule(self, cmd: ScheduleDomain, ctx: Context) -> Placement:
        spec = cmd.spec
        structlog.contextvars.bind_contextvars(domain_id=str(spec.uuid))
        request = PlacementRequest.of(cmd)
        # A redelivered command looks for an earlier copy's claim once, before its first try:
        # after a refusal that host is released, and there is nothing new to find.
        earlier, covered = (
            self._earlier_claim(request, set(), ctx.envelope.ts)
            if ctx.redelivered
            else (None, True)
        )
        # Before any host is asked: a retry elsewhere (or a redelivered command) gets the
        # same ports, as AllocatePorts is idempotent by domain.
        ports = self._allocate_ports(cmd, ctx.envelope.id) if spec.nics else []
        try:
            placement = self._place(cmd, ctx, request, earlier, ports, patient=not covered)
        except ServiceError:
            # No host took it (or the spec was refused): the ports go back. Anything else
            # (a lost connection) leaves them to the redelivered command, which gets the same.
            if ports:
                self._release_ports(spec.uuid)
            raise
        return placement

    def _place(
        self,
        cmd: ScheduleDomain,
        ctx: Context,
        request: PlacementRequest,
        earlier: Claim | None,
        ports: list[PortBinding],
        *,
        patient: bool = False,
    ) -> Placement:
        """Try hosts until one takes the domain. `patient`: a redelivered command whose
        earlier copy's claim this replica could not see; if nothing fits at first, it waits
        for hosts it has not heard from (`_late_holder`) before answering `no_valid_host`."""
        attempts: list[Attempt] = []
        refused: set[str] = set()
        filtered: Filtered = {}
        for _ in range(min(cmd.max_attempts, self.config.max_attempts)):
            claim, earlier = earlier, None
            if claim is None:
                decision = self.placer.decide(request, replica=self.replica, exclude=refused)
                filtered = decision.filtered
                if isinstance(decision, Decision):
                    claim = decision.claim
                elif patient and not attempts:
                    claim = self._late_holder(request)
                if claim is None:
                    break
            patient = False
            try:
                info = self._spawn(claim, cmd, ctx.envelope.id, ports)
            except HostRefused as exc:
                self._release(claim)
                attempts.append(Attempt(host=claim.host, code=exc.code, message=exc.message))
                refused.add(claim.host)
                log.info("host refused", host=claim.host, code=exc.code, reason=exc.message)
                continue
            except HostInDoubt as exc:
                self._release(claim)
                attempts.append(Attempt(host=claim.host, code="unavailable", message=str(exc)))
                log.warning("host in doubt: no other host tried", host=claim.host)
                why = f"{_why(attempts, filtered)}; {claim.host} may still start it: not retried"
                raise ServiceError("no_valid_host", why, _details(attempts, filtered)) from None
            except ClaimUnconfirmed as exc:
                # Nothing was sent to the host: the claim goes (a peer that saw it drops it
                # on `released`) and the command goes back to the broker, no attempt spent.
                # Counted as the host's refusal, a link down for a moment burnt every attempt
                # at once and answered `no_valid_host` with room to spare.
                self._release(claim)
                log.warning("claim not confirmed: left for redelivery", host=claim.host)
                raise handed_back(str(exc)) from None
            except LinkLost as exc:
                # Not the host's answer: it may have defined and started the domain. The claim
                # stays (announced: a peer that gets the command finds it) and the command
                # goes back to the broker; its next copy replays the same ids to this host.
                log.warning("connection lost while placing: left for redelivery", host=claim.host)
                raise handed_back(f"connection lost while asking {claim.host}: {exc}") from None
            except BaseException:
                self._release(claim)
                raise
            self._placed(claim, info.claim_seq)
            log.info("placed", host=claim.host, attempts=len(attempts))
            return Placement(host=claim.host, info=info, attempts=attempts)
        raise ServiceError("no_valid_host", _why(attempts, filtered), _details(attempts, filtered))

    def call(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        """RPC to a compute node (the seam unit tests replace); `expires` as Bus.call's."""
        if self.bus is None:
            raise RuntimeError("SchedulerService has no bus")
        return self.bus.call(
            queue, command, timeout=timeout, message_id=message_id, expires=expires
        )

    # ---- what the replica hears --------------------------------------------------------------

    def on_event(self, envelope: Envelope, event: Message) -> None:
        """Everything the private subscription delivers, in order."""
        now = time.monotonic()
        if isinstance(event, HostHeartbeat):
            self.state.on_heartbeat(event, sent_at=envelope.ts, now=now)
        elif isinstance(event, DomainStarted):
            self.state.on_domain_started(event.domain_id, event.host)
        elif isinstance(event, DomainDefined) and event.detail is DefinedDetail.MIGRATED:
            self.state.on_domain_started(event.domain_id, event.host)  # it lives there now
        elif isinstance(event, DomainMigrationProgress):
            self.on_migration_progress(event)
        elif isinstance(event, DomainUndefined):
            self.state.on_domain_undefined(event.domain_id, event.host)
        elif isinstance(event, DomainStopped):
            pass  # still defined there: its group membership and host stand
        elif isinstance(event, PlacementClaim) and event.replica != self.replica:
            self.on_peer_claim(event, sent_at=envelope.ts, now=now)
        elif isinstance(event, PlacementSync) and self.sync is not None:
            self.sync.heard(event)


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
        return self.listen(timeout).serve()

    def listen(self, timeout: float = 30.0) -> Scheduler:
        """Connect and subscribe: from now on the state follows the cluster (and the peers'
        claims), but no `ScheduleDomain` is taken until `serve()`."""
        if self._own_bus:
            self.bus.start(timeout)
        self.subscription = self.bus.subscribe(SUBSCRIBED, self.service.on_event, prefetch=1000)
        if self.service.sync is not None:
            self.service.sync.attach(self.subscription.decl.name)
        return self

    def serve(self) -> Scheduler:
        """Take `ScheduleDomain` from the shared `scheduler` queue."""
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
