"""What one scheduler replica knows about the cluster: hosts (from heartbeats), claims in
flight (its own and its peers'), and where each domain lives and which group it is in.
A server group belongs to a project: groups are keyed by (project, name), so one project's
`web` never constrains (or reveals) another's.

Everything is guarded by `ClusterState.lock`; the placer holds it across filter → weigh →
pick → claim so two decisions of one replica never see the same free room.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from protos.domain import DomainSpec, PlacementPolicy
from protos.host import HostHeartbeat, HostInventory, Resources
from protos.scheduler import ScheduleDomain

SETTLE_BEATS = 3
# A host whose heartbeat is this many intervals late has missed one: it may be restarting.
SILENT_INTERVALS = 1.5


@dataclass(slots=True)
class HostState:
    """A host as its last heartbeat described it, plus the claims not yet in its usage."""

    name: str
    inventory: HostInventory
    usage: Resources
    enabled: bool
    interval_s: float
    seen_at: float  # monotonic time the last heartbeat arrived
    vcpu_limit: float  # capacity x allocation ratio
    memory_limit_mib: float
    sent_at: float = float("-inf")  # wall-clock time the last heartbeat was sent (host's clock)
    claimed_vcpus: int = 0
    claimed_memory_mib: int = 0
    # limit - usage - claims, kept up to date by `refresh()` (plain fields: filters and weighers
    # read them for every host of every decision).
    free_vcpus: float = 0.0
    free_memory_mib: float = 0.0
    claims: dict[uuid.UUID, Claim] = field(default_factory=dict)
    # Monotonic time of its first heartbeat after a silence (a restart); -inf if none yet.
    back_at: float = float("-inf")
    # Monotonic time it last left a define or start unanswered, its clean-up unconfirmed,
    # while it beat on (a worker stuck behind its heartbeat); None once it answers again or
    # restarts. The `responsive` filter passes it by for `unanswered_retry_s`.
    unanswered_at: float | None = None
    # The claim count its last heartbeat's usage was read at (0: the host does not say).
    claims_seq: int = 0

    def refresh(self) -> None:
        self.free_vcpus = self.vcpu_limit - self.usage.vcpus - self.claimed_vcpus
        self.free_memory_mib = (
            self.memory_limit_mib - self.usage.memory_mib - self.claimed_memory_mib
        )


@dataclass(frozen=True, slots=True)
class Hearing:
    """How current a replica's picture of the hosts is, at monotonic `now`: what silence is
    judged by (`host_down`).

    A replica that falls behind its event stream (a busy process, a broker that stalled)
    takes heartbeats late but in order: by its own clock every host goes silent at once, while
    by the stream (the heartbeats' sending times) none missed a beat. And one that hears no
    host at all cannot tell whether they all stopped or it stopped hearing; for a while it
    assumes the latter, as Kubernetes' node controller does when a whole zone goes quiet."""

    now: float
    newest_sent: float = float("inf")  # sending time (wall clock) of the newest heartbeat taken
    heard_at: float = float("inf")  # monotonic time a heartbeat (any host's) was last taken

    def host_down(self, host: HostState, down_after: float, grace: float) -> bool:
        """Whether `host` has been silent for `down_after` of its intervals by the replica's
        clock and by the stream: other hosts' heartbeats sent that much later were taken since
        (sender clocks, kept by NTP; a host whose clock is off but that beats on is never
        down), or no host at all was heard from for `grace` of its intervals more."""
        limit = down_after * host.interval_s
        if self.now - host.seen_at <= limit:
            return False
        if self.newest_sent - host.sent_at > limit:
            return True
        return self.now - self.heard_at > grace * host.interval_s


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A server group: its name within the project that owns it."""

    project: str
    name: str


@dataclass(slots=True)
class Claim:
    """Resources held on `host` for a domain whose usage the host's heartbeat does not show yet.

    In flight while the compute node is being asked; once it took the domain, the claim
    is settled. When the host said at which count of its claim changes it took the domain
    (`claim_seq`), the claim is dropped by the first heartbeat whose usage was read at that
    count or later (`claims_seq`): exactly when the usage counts the domain, never twice and
    never not at all. Otherwise (a host that does not say) it `settles_at` a wall-clock time:
    the first heartbeat sent at or after it counts the domain, and the claim is dropped;
    whatever the timestamps say (clocks differ between machines), it is dropped at the latest
    when `SETTLE_BEATS` heartbeats have arrived since (a heartbeat is sent every interval, so
    the last of them was sent after the answer). A beat read between the host's claim and the
    answer counted the domain while the claim still stood: the domain counted twice until the
    next beat, and a host with room for it was filtered out. `lapses_at` (monotonic) drops a
    claim still in flight (a peer replica that died mid-request). `waits_on`: the source of a
    migration queued there (held, not settling): the claim goes once that host is down (a
    source that restarts cancels its queued jobs, and one that never comes back runs none)."""

    domain_id: uuid.UUID
    host: str
    vcpus: int
    memory_mib: int
    group: GroupKey | None
    replica: str
    settles_at: float | None = None
    beats_left: int = 0
    lapses_at: float | None = None
    claim_seq: int | None = None
    waits_on: str | None = None


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One domain to place, with what the filters need precomputed once per decision."""

    domain_id: uuid.UUID
    vcpus: int
    memory_mib: int
    group: GroupKey | None = None
    policy: PlacementPolicy = PlacementPolicy.ANTI_AFFINITY
    forced_host: str | None = None
    group_hosts: frozenset[str] = frozenset()  # hosts holding members of `group`
    now: float = 0.0  # monotonic time of the decision
    hearing: Hearing | None = None  # None: the stream is taken as current (`Hearing(now)`)
    # Hosts named by the disks' and images' bindings (host-local pools): it must run there.
    volume_hosts: frozenset[str] = frozenset()
    # Host-local pools the host must have (a migration's volumes move to their namesakes).
    pools: frozenset[str] = frozenset()

    @classmethod
    def from_spec(
        cls, spec: DomainSpec, project: str, volume_hosts: frozenset[str] = frozenset()
    ) -> PlacementRequest:
        """The request for `spec` of `project` (whose group, if any, it is), whose storage
        bindings name `volume_hosts`."""
        name = spec.placement.group
        return cls(
            domain_id=spec.uuid,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            group=GroupKey(project, name) if name is not None else None,
            policy=spec.placement.policy,
            forced_host=spec.placement.host,
            volume_hosts=volume_hosts,
        )

    @classmethod
    def of(cls, cmd: ScheduleDomain) -> PlacementRequest:
        """The request `cmd` makes, its bindings' hosts included."""
        refs = [*cmd.disks, cmd.kernel_image, cmd.initrd_image]
        hosts = frozenset(r.host for r in refs if r is not None and r.host is not None)
        return cls.from_spec(cmd.spec, cmd.project, hosts)


class ClusterState:
    def __init__(
        self, down_after_intervals: float = 3.0, silence_grace_intervals: float = 10.0
    ) -> None:
        self.lock = threading.RLock()
        self.down_after_intervals = down_after_intervals
        self.silence_grace_intervals = silence_grace_intervals
        # The newest heartbeat taken from any host: its sending time and when it was taken.
        self.newest_sent = float("-inf")
        self.heard_at = float("-inf")
        self.hosts: dict[str, HostState] = {}
        self.claims: dict[uuid.UUID, Claim] = {}
        self.domain_host: dict[uuid.UUID, str] = {}
        self.domain_group: dict[uuid.UUID, GroupKey] = {}
        self.group_members: defaultdict[GroupKey, set[uuid.UUID]] = defaultdict(set)

    # ---- hosts -------------------------------------------------------------------------------

    def on_heartbeat(self, beat: HostHeartbeat, *, sent_at: float, now: float) -> HostState:
        """Take `beat` (sent at wall-clock `sent_at`, arrived at monotonic `now`); drop the
        claims it now accounts for and the ones that lapsed."""
        inv = beat.inventory
        with self.lock:
            host = self.hosts.get(beat.host)
            if host is None:
                host = HostState(
                    name=beat.host,
                    inventory=inv,
                    usage=beat.usage,
                    enabled=beat.enabled,
                    interval_s=beat.interval_s,
                    seen_at=now,
                    vcpu_limit=0.0,
                    memory_limit_mib=0.0,
                )
                self.hosts[beat.host] = host
            elif self._silent(host, now):
                host.back_at = now  # heard from again after a silence (a restart)
                host.unanswered_at = None
            host.inventory = inv
            host.usage = beat.usage
            host.enabled = beat.enabled
            host.interval_s = beat.interval_s
            host.seen_at = now
            host.sent_at = max(host.sent_at, sent_at)
            self.newest_sent = max(self.newest_sent, sent_at)
            self.heard_at = now
            host.claims_seq = beat.claims_seq or 0
            host.vcpu_limit = inv.capacity.vcpus * inv.cpu_allocation_ratio
            host.memory_limit_mib = inv.capacity.memory_mib * inv.ram_allocation_ratio
            done = []
            for c in host.claims.values():
                if c.settles_at is not None and c.claim_seq is not None and beat.claims_seq:
                    if beat.claims_seq >= c.claim_seq:
                        done.append(c.domain_id)
                elif c.settles_at is not None:
                    c.beats_left -= 1
                    if c.settles_at <= sent_at or c.beats_left <= 0:
                        done.append(c.domain_id)
                elif c.lapses_at is not None and c.lapses_at <= now:
                    done.append(c.domain_id)
                elif c.settles_at is None and c.waits_on is not None:
                    source = self.hosts.get(c.waits_on)
                    if source is None or not self.is_alive(source, now):
                        done.append(c.domain_id)
            for domain_id in done:
                self._drop_claim(domain_id)
            host.refresh()
            return host

    def hearing(self, now: float) -> Hearing:
        return Hearing(now, self.newest_sent, self.heard_at)

    def is_alive(self, host: HostState, now: float) -> bool:
        """Not down by `Hearing.host_down` (enabled or not)."""
        down = self.hearing(now).host_down(
            host, self.down_after_intervals, self.silence_grace_intervals
        )
        return not down

    def restarting(self, name: str, since: float, now: float) -> bool:
        """Whether host `name` went silent after monotonic `since`: it missed a heartbeat
        and is silent now (down, or restarting: its durable queue keeps what it was sent), or
        it came back after `since` (it may be running what it was sent before it went away)."""
        with self.lock:
            host = self.hosts.get(name)
            if host is None:
                return False
            return self._silent(host, now) or host.back_at >= since

    def beating(self, name: str, now: float) -> bool:
        """Whether host `name` is heard from now (not silent for 1.5 intervals): its worker
        may still act on what it was sent, late."""
        with self.lock:
            host = self.hosts.get(name)
            return host is not None and not self._silent(host, now)

    def unanswered(self, name: str, now: float) -> None:
        """Host `name` left a command unanswered while it beat on: pass it by for a while."""
        with self.lock:
            host = self.hosts.get(name)
            if host is not None:
                host.unanswered_at = now

    def answered(self, name: str) -> None:
        """Host `name` answered a command: it takes requests again."""
        with self.lock:
            host = self.hosts.get(name)
            if host is not None:
                host.unanswered_at = None

    @staticmethod
    def _silent(host: HostState, now: float) -> bool:
        return now - host.seen_at > SILENT_INTERVALS * host.interval_s

    # ---- claims ------------------------------------------------------------------------------

    def add_claim(self, claim: Claim) -> None:
        """Hold `claim` on its host and count the domain as living there (and in its group)."""
        with self.lock:
            self._drop_claim(claim.domain_id)
            host = self.hosts.get(claim.host)
            if host is not None:
                host.claims[claim.domain_id] = claim
                host.claimed_vcpus += claim.vcpus
                host.claimed_memory_mib += claim.memory_mib
                host.refresh()
            self.claims[claim.domain_id] = claim
            self._place(claim.domain_id, claim.host, claim.group)

    def release(self, domain_id: uuid.UUID) -> Claim | None:
        """The host did not take the domain: free the room and forget it lives there."""
        with self.lock:
            claim = self._drop_claim(domain_id)
            if claim is not None and self.domain_host.get(domain_id) == claim.host:
                self._forget(domain_id)
            return claim

    def settle(
        self, domain_id: uuid.UUID, *, settles_at: float, claim_seq: int | None = None
    ) -> None:
        """The host took the domain (at its claim count `claim_seq`, if it said): keep the
        claim until a heartbeat shows it (see `Claim`)."""
        with self.lock:
            claim = self.claims.get(domain_id)
            if claim is None:
                return
            claim.settles_at = settles_at
            claim.claim_seq = claim_seq
            claim.waits_on = None
            claim.beats_left = SETTLE_BEATS
            claim.lapses_at = None
            # A beat read at that count or later came while the claim was in flight: its
            # usage counts the domain already, so the claim goes now (kept, it counted the
            # domain twice until the next beat, and a host with room was filtered out).
            host = self.hosts.get(claim.host)
            if claim_seq is not None and host is not None and host.claims_seq >= claim_seq:
                self._drop_claim(domain_id)

    def _drop_claim(self, domain_id: uuid.UUID) -> Claim | None:
        claim = self.claims.pop(domain_id, None)
        if claim is None:
            return None
        host = self.hosts.get(claim.host)
        if host is not None and host.claims.pop(domain_id, None) is not None:
            host.claimed_vcpus -= claim.vcpus
            host.claimed_memory_mib -= claim.memory_mib
            host.refresh()
        return claim

    # ---- domains and groups ------------------------------------------------------------------

    def on_domain_started(self, domain_id: uuid.UUID, host: str) -> None:
        with self.lock:
            self._place(domain_id, host, self.domain_group.get(domain_id))

    def on_domain_undefined(self, domain_id: uuid.UUID, host: str) -> None:
        """Forget the domain, unless it lives elsewhere now (a refusing host's clean-up).
        Its claim on that host goes too: the host no longer holds anything for it, and
        waiting for a heartbeat to say so would refuse the next requests meanwhile."""
        with self.lock:
            claim = self.claims.get(domain_id)
            if claim is not None and claim.host == host and claim.settles_at is not None:
                self._drop_claim(domain_id)
            if self.domain_host.get(domain_id) == host:
                self._forget(domain_id)

    def learn(self, domain_id: uuid.UUID, host: str, group: GroupKey | None) -> None:
        """A peer replica placed the domain on `host`."""
        with self.lock:
            self._place(domain_id, host, group)

    def group_hosts(
        self, group: GroupKey | None, besides: uuid.UUID | None = None
    ) -> frozenset[str]:
        """The hosts of `group`'s members (other than `besides`)."""
        if group is None:
            return frozenset()
        with self.lock:
            members = self.group_members.get(group, ())
            return frozenset(
                self.domain_host[d] for d in members if d in self.domain_host and d != besides
            )

    def _place(self, domain_id: uuid.UUID, host: str, group: GroupKey | None) -> None:
        self.domain_host[domain_id] = host
        if group is not None:
            self.domain_group[domain_id] = group
            self.group_members[group].add(domain_id)

    def _forget(self, domain_id: uuid.UUID) -> None:
        self.domain_host.pop(domain_id, None)
        group = self.domain_group.pop(domain_id, None)
        if group is not None:
            members = self.group_members.get(group)
            if members is not None:
                members.discard(domain_id)
                if not members:
                    del self.group_members[group]
