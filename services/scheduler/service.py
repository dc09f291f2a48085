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

A redelivered `ScheduleDomain` (its first replica died or lost its connection before acking)
takes over the claim an earlier copy made instead of deciding afresh, so the domain is defined
on one host whichever replica gets the copy (`SchedulerService._earlier_claim`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog

from protos import routing
from protos.base import Message
from protos.bindings import PortBinding
from protos.codec import Envelope
from protos.commands import (
    Command,
    DefineDomain,
    DestroyDomain,
    GetDomainInfo,
    StartDomain,
    UndefineDomain,
)
from protos.events import (
    DefinedDetail,
    DomainDefined,
    DomainMigrationProgress,
    DomainStarted,
    DomainStopped,
    DomainUndefined,
)
from protos.host import HostHeartbeat
from protos.network import AllocatePorts, BindPorts, PortBindings, ReleasePorts
from protos.replies import DomainInfo
from protos.scheduler import (
    Attempt,
    ClaimPhase,
    Placement,
    PlacementClaim,
    PlacementSync,
    ScheduleDomain,
)
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
from services.scheduler.catch_up import CatchUp
from services.scheduler.config import SchedulerConfig
from services.scheduler.filters import build_filters
from services.scheduler.migration import MigrationHandlers
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
    "domain.defined.*",  # a cold migration's arrival (detail migrated)
    "domain.migration_progress.*",  # a migration's end: where the domain lives now
    "domain.stopped.*",
    "domain.undefined.*",
    "placement.*.*",
)
# How often a redelivered command with no host looks again for hosts not heard from yet.
LATE_HOST_POLL_S = 0.5
_IDS = uuid.UUID("6b1e0f8e-5c1d-4f0a-9a51-0c9b8f3c2d10")  # namespace of derived message ids


class HostRefused(Exception):
    """The chosen host did not take the domain; another may."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HostInDoubt(Exception):
    """A host still beating did not answer a define or start, nor confirm its clean-up: it
    may yet run the domain, so no other host may be asked (two copies could run)."""


class SchedulerService(MigrationHandlers, Service):
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
        if ports:
            self._bind_ports(spec.uuid, placement.host, ctx.envelope.id)
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
            except BaseException:
                self._release(claim)
                raise
            self._placed(claim, info.claim_seq)
            log.info("placed", host=claim.host, attempts=len(attempts))
            return Placement(host=claim.host, info=info, attempts=attempts)
        raise ServiceError("no_valid_host", _why(attempts, filtered), _details(attempts, filtered))

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

    # ---- ports (the network service) -----------------------------------------------------

    def _allocate_ports(self, cmd: ScheduleDomain, request_id: str) -> list[PortBinding]:
        """The domain's ports, one per NIC in order. A refusal (unknown network, address or
        MAC taken, ...) is the caller's answer as it is; no network service is `unavailable`."""
        command = AllocatePorts(domain_id=cmd.spec.uuid, project=cmd.project, nics=cmd.spec.nics)
        reply = self._network(command, f"{request_id}:ports")
        if not isinstance(reply, PortBindings) or len(reply.ports) != len(cmd.spec.nics):
            raise ServiceError("internal", f"the network service answered {reply!r}")
        log.info("ports allocated", ports=[str(p.port_id) for p in reply.ports])
        return list(reply.ports)

    def _bind_ports(self, domain_id: uuid.UUID, host: str, request_id: str) -> None:
        """Tell the network service where the ports live (it announces `port.bound`, from
        which the other hosts learn this host's VXLAN address for them). The domain runs
        already: a failure is logged, not the caller's."""
        with self.state.lock:
            known = self.state.hosts.get(host)
            vtep = known.inventory.vtep if known is not None else None
        try:
            self._network(
                BindPorts(domain_id=domain_id, host=host, vtep=vtep), f"{request_id}:bind:{host}"
            )
        except ServiceError as exc:
            log.warning("ports not bound", host=host, code=exc.code, error=exc.message)

    def _release_ports(self, domain_id: uuid.UUID) -> None:
        """Placement failed: the ports (and their addresses) go back; best effort."""
        try:
            self._network(ReleasePorts(domain_id=domain_id), None)
            log.info("ports released")
        except ServiceError as exc:
            log.warning("ports not released", code=exc.code, error=exc.message)

    def _network(self, command: Command, key: str | None) -> Message:
        """RPC to the network service; its errors and absence as ServiceError."""
        message_id = None if key is None else str(uuid.uuid5(_IDS, key))
        try:
            return self.call(
                routing.NETWORK_QUEUE,
                command,
                timeout=self.config.compute_timeout_s,
                message_id=message_id,
            )
        except RemoteError as exc:
            raise ServiceError(exc.code, f"network service: {exc.message}", exc.details) from None
        except NoRouteError:
            raise ServiceError(
                "unavailable", "NICs need the network service, and none is running"
            ) from None
        except (RpcTimeout, BusError) as exc:
            raise ServiceError("unavailable", f"network service: {exc}") from None

    # ---- the chosen host -------------------------------------------------------------------

    def _spawn(
        self, claim: Claim, cmd: ScheduleDomain, request_id: str, ports: list[PortBinding]
    ) -> DomainInfo:
        """Define (and start) the domain on the claim's host; raise HostRefused if it will not,
        having removed what was left there; a non-retryable answer is raised as ServiceError."""
        host = claim.host
        self._announce(ClaimPhase.CLAIMED, claim)
        defined = False
        try:
            define = DefineDomain(
                spec=cmd.spec,
                privileged=cmd.privileged,
                disks=cmd.disks,
                kernel_image=cmd.kernel_image,
                initrd_image=cmd.initrd_image,
                ports=ports,
                start=cmd.start,  # kept there: a create cut off before its start is finished
            )
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
            if isinstance(exc, NoRouteError):
                raise HostRefused("unavailable", str(exc)) from None
            if self.state.beating(host, time.monotonic()):
                # Alive, it may still run what it was sent (taken before its expiry, slow).
                # Another host is asked only once this one confirms the domain is gone.
                if not self._cleaned_up(host, cmd.spec.uuid):
                    raise HostInDoubt(f"{exc}; its clean-up was not confirmed") from None
            else:
                # Silent: what waits in its queue has expired by the time it is back (it
                # will not run); the clean-up removes the definition then, best effort.
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

    def _cleaned_up(self, host: str, domain_id: uuid.UUID) -> bool:
        """Destroy and undefine the domain on a live host that did not answer its define or
        start in time; True once the host confirmed it is gone (undefined, or not there).

        No expiry on these: they wait for the host's domain lock, so a start under way ends
        first and is undone, and a start taken after them finds no domain (or is expired,
        as the define and start expire when the scheduler stops waiting). A start that slips
        in between the two (a clock behind the scheduler's) makes the undefine a `conflict`:
        both are sent again. Waited for up to `cleanup_timeout_s` in all."""
        queue = routing.compute_queue(host)
        deadline = time.monotonic() + self.config.cleanup_timeout_s
        for _ in range(3):
            for command in (
                DestroyDomain(domain_id=domain_id),
                UndefineDomain(domain_id=domain_id),
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    self.call(queue, command, timeout=remaining, message_id=None)
                except RemoteError as exc:
                    if exc.code == "not_found":
                        return True
                    if exc.code == "conflict":
                        continue  # a destroy of a stopped domain; an undefine of a running one
                    log.warning("clean-up refused", host=host, command=command.TYPE, error=str(exc))
                    return False
                except BusError as exc:
                    log.warning(
                        "clean-up not confirmed", host=host, command=command.TYPE, error=str(exc)
                    )
                    return False
                else:
                    if isinstance(command, UndefineDomain):
                        return True
        return False

    def _call(self, host: str, command: Command, key: str) -> DomainInfo:
        """Send `command` to `host` and wait for its answer. Derived ids make a redelivered
        ScheduleDomain replay the same commands, which the compute node answers from its
        idempotency record.

        A host that does not answer within `compute_timeout_s` because it went silent meanwhile
        (its worker restarting: the command waits in its durable queue, or is redelivered to
        it if it was under way) is asked again with the same id, up to `restart_wait_s` in
        all: it runs the command once when it is back and answers every copy. Giving up on it
        then would leave the command to run after the clean-up sent in its place, or beside
        it (a restarted worker takes all of them at once). Raises RpcTimeout when the host is
        not restarting or the wait is over."""
        message_id = str(uuid.uuid5(_IDS, key))
        sent_at = time.monotonic()
        give_up_at = sent_at + max(self.config.compute_timeout_s, self.config.restart_wait_s)
        timeout = self.config.compute_timeout_s
        while True:
            try:
                # It expires when this wait ends: a host that takes it later does not run
                # it (a copy sent again carries a fresh expiry).
                reply = self.call(
                    routing.compute_queue(host),
                    command,
                    timeout=timeout,
                    message_id=message_id,
                    expires=True,
                )
                break
            except RpcTimeout:
                now = time.monotonic()
                if now >= give_up_at or not self.state.restarting(host, sent_at, now):
                    raise
                timeout = min(self.config.compute_timeout_s, give_up_at - now)
                log.info("host restarting: asking again", host=host, command=command.TYPE)
        assert isinstance(reply, DomainInfo), reply
        return reply

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
                raise HostRefused("unavailable", f"claim not confirmed: {exc}") from None
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
