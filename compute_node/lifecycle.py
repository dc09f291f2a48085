"""The compute node's command handlers: the domain lifecycle on this host.

Every command checks the one transition table (protos.states) before acting; a refusal is an
`ErrorReply` with code `conflict` carrying the current state. Changes of state come only from
the driver's GuestEvents (`on_guest_event`), which is where events are emitted, so nothing is
announced that did not happen.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import structlog

from compute_node.boot_sources import BootFiles, BootSources
from compute_node.causes import PendingCauses
from compute_node.console import ConsoleHandlers
from compute_node.driver import (
    DomainNotRunning,
    Driver,
    DriverError,
    GuestEvent,
    GuestEventKind,
    NicTap,
)
from compute_node.launching import refused
from compute_node.migrating import MigrationHandlers
from compute_node.net import PlumbingError
from compute_node.networks import HostNetworks, NetworkRefused, interface_of
from compute_node.resources import Claims
from compute_node.saved_states import StateAreas
from compute_node.saving import SaveHandlers
from compute_node.storage_sources import StorageBindings, StorageSources, disk_layout
from compute_node.store import DomainRecord, EventDraft, NameTaken, Store
from compute_node.translate import translate
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    GetDomainInfo,
    ListDomains,
    PauseDomain,
    RebootDomain,
    RebootMode,
    ResumeDomain,
    ShutdownDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import DomainSpec, PowerState
from protos.events import DefinedDetail, DomainDefined, DomainUndefined, UndefinedDetail
from protos.replies import ConsoleOutput, DomainInfo, DomainList, Interface
from protos.scheduler import SetHostEnabled
from protos.states import Action, Verdict, decide
from services.bus import Cause, Context, Service, ServiceError, handles

log = structlog.get_logger("flotilla.compute")
K = GuestEventKind
T = TypeVar("T")
# The store's host setting for SetHostEnabled: {"enabled", "reason", "generation"}.
ENABLED_KEY = "enabled"


class Lifecycle(ConsoleHandlers, SaveHandlers, MigrationHandlers, Service):
    name = "compute"

    def __init__(
        self,
        host: str,
        store: Store,
        driver: Driver,
        claims: Claims,
        sources: BootSources,
        *,
        storage: StorageSources | None = None,
        states: StateAreas | None = None,
    ) -> None:
        self.host = host
        self.sources = sources
        # The node's pools, where the volumes and images of bindings are found.
        self.storage = storage or StorageSources(host, {})
        self.store = store
        # Whether the scheduler may place new guests here (heartbeat `enabled`), kept in the
        # store across restarts, and the generation of the SetHostEnabled that said so.
        self.enabled, self.disabled_reason, self.enabled_generation = True, "", 0
        if (kept := store.setting(ENABLED_KEY)) is not None:
            switch = json.loads(kept)
            self.enabled = bool(switch["enabled"])
            self.disabled_reason = str(switch["reason"])
            self.enabled_generation = int(switch["generation"])
        self._switch_lock = threading.Lock()
        # Says a switch taken at once (a heartbeat now, not at the next interval: the
        # schedulers learn the host's switch from its heartbeats).
        self.switched: Callable[[], None] = lambda: None
        # Where saves and snapshots go (compute_node.saved_states).
        self.states = states or StateAreas(host, store.directory / "states", self.storage.pools)
        self.driver = driver
        self.claims = claims
        self._locks: defaultdict[uuid.UUID, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self.causes = PendingCauses()
        # Guest NICs' plumbing (None: a host without any, the fake driver's: ports are kept
        # and handed to the driver, nothing is plumbed).
        self.networks: HostNetworks | None = None
        self._init_migrations()
        driver.set_event_sink(self.on_guest_event)

    # ---- helpers ---------------------------------------------------------------------------

    def _lock(self, domain_id: uuid.UUID) -> threading.Lock:
        with self._locks_guard:
            return self._locks[domain_id]

    def _record(self, domain_id: uuid.UUID) -> DomainRecord:
        record = self.store.get(domain_id)
        if record is None or record.incoming is not None:  # migrating in: not ours yet
            raise ServiceError("not_found", f"no domain {domain_id} on host {self.host}")
        return record

    def _check(self, record: DomainRecord, action: Action) -> bool:
        """True to go ahead, False for a no-op; raise ServiceError(conflict) for a refusal."""
        decision = decide(record.state, self._task(record.id), action)
        if decision.verdict is Verdict.REFUSE:
            raise ServiceError(
                "conflict", decision.reason, {"state": record.state.value, "action": action.value}
            )
        return decision.verdict is Verdict.ALLOW

    def info(self, domain_id: uuid.UUID) -> DomainInfo:
        record = self._record(domain_id)
        pid = cpu = None
        if record.state is not PowerState.SHUTOFF:
            try:
                runtime = self.driver.get_info(domain_id)
                pid, cpu = runtime.pid, runtime.cpu_time_ns
            except DriverError:
                pass
        spec = record.spec
        return DomainInfo(
            domain_id=spec.uuid,
            name=spec.name,
            host=self.host,
            state=record.state,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            seq=record.seq,
            autostart=spec.autostart,
            pid=pid,
            cpu_time_ns=cpu,
            interfaces=[Interface.model_validate(interface_of(p)) for p in record.ports],
            managed_save=record.managed_save is not None,
            claim_seq=self.claims.claimed_at(spec.uuid),
        )

    # ---- driver events ---------------------------------------------------------------------

    def _consume(self, event: GuestEvent) -> None:
        """Persist what happened to a guest and the events it means, once per driver event
        (called through `on_guest_event`, which holds back a domain migrating in)."""
        progress = self.store.progress(event.domain_id)
        if progress is None:
            log.warning("event for an unknown domain", domain_id=str(event.domain_id))
            return
        if event.n <= progress.driver_n:
            return  # already consumed before a restart
        drafts, after = translate(event, progress.state)
        cause = self.causes.take(event.domain_id, event.kind)
        if cause is not None:
            drafts = [dataclasses.replace(d, cause=cause) for d in drafts]
        # A process kept by a preserve policy holds its claim until start, destroy or
        # undefine ends it (host usage counts it while it lives).
        release = after is PowerState.SHUTOFF and not self.driver.process_stays(event)
        with self.store.exclusive():
            self.store.transition(
                event.domain_id,
                drafts,
                state=after,
                driver_n=event.n,
                journaled=None if event.ts is None else f"{event.n}/{event.ts!r}",
            )
            if release:
                # Stored, not yet published (the outbox waits for the store's lock): the
                # heartbeat that shows the room, and the domain shut off, goes out first.
                self.claims.release(event.domain_id)
        log.info(
            "guest event",
            domain_id=str(event.domain_id),
            kind=event.kind.value,
            reason=event.reason,
            state=after.value,
        )

    # ---- commands ----------------------------------------------------------------------------

    @handles(DefineDomain)
    def define(self, cmd: DefineDomain, ctx: Context) -> DomainInfo:
        info = self._define(cmd, ctx)
        if not (cmd.start and cmd.and_start):
            return info
        # Out of the definition's lock (start_domain takes it), and only while the start is
        # still pending: a domain that ran since (a start that came between) is not started
        # again. A refusal is this command's answer; the definition stays (its sender's to
        # undefine, as after a StartDomain's refusal).
        self.start_domain(cmd.spec.uuid, cause=ctx.cause, ctx=ctx, if_pending=True)
        return self.info(cmd.spec.uuid)

    def _define(self, cmd: DefineDomain, ctx: Context) -> DomainInfo:
        cmd = self._carry_bindings(cmd)
        spec = cmd.spec
        bindings = StorageBindings.of(cmd)
        ports = tuple(cmd.ports)
        with refused():
            self.sources.check(spec, privileged=cmd.privileged)
            self.storage.exist(spec, bindings)
        self._check_ports(cmd)
        with self._lock(spec.uuid):
            ctx.check_expiry()  # the sender gave up while it waited: its clean-up may follow
            existing = self.store.get(spec.uuid)
            if existing is not None and existing.incoming is not None:
                raise ServiceError(
                    "conflict",
                    f"domain {spec.uuid} is migrating to host {self.host}",
                    {"action": Action.DEFINE.value},
                )
            state = existing.state if existing else PowerState.SHUTOFF
            # A start asked for is pending until the machine runs (None: as it was).
            pending = None if cmd.start is None else cmd.start and state is PowerState.SHUTOFF
            if existing is not None:
                self._check(existing, Action.DEFINE)
                if (
                    existing.spec == spec
                    and existing.privileged == cmd.privileged
                    and existing.bindings == bindings
                    and existing.ports == ports
                ):
                    if pending is not None and pending != existing.start_pending:
                        self.store.set_start_pending(spec.uuid, pending)
                    return self.info(spec.uuid)  # nothing changed: no event
                self._check_disk_change(existing, spec, bindings)
                detail = DefinedDetail.UPDATED
            else:
                detail = DefinedDetail.ADDED
            try:
                self.store.define(
                    spec,
                    [EventDraft(DomainDefined, state, detail, cause=ctx.cause)],
                    privileged=cmd.privileged,
                    bindings=bindings,
                    ports=ports,
                    start_pending=pending,
                )
            except NameTaken as exc:
                raise ServiceError("conflict", str(exc), {"name": spec.name}) from None
            if existing is not None and self.networks is not None:
                # Ports a redefinition dropped are unplugged now; new ones at start.
                kept = {p.port_id for p in ports}
                self._network_call(
                    lambda: self.networks.detach(  # type: ignore[union-attr]
                        [p for p in existing.ports if p.port_id not in kept]
                    )
                )
            return self.info(spec.uuid)

    def _carry_bindings(self, cmd: DefineDomain) -> DefineDomain:
        """A redefinition that brings no ports for unchanged NICs keeps the definition's
        current ones: the API redefines a domain to attach or detach a disk without going
        back to the network service (it resolves the boot image again itself)."""
        existing = self.store.get(cmd.spec.uuid)
        if existing is None:
            return cmd
        if cmd.ports or not cmd.spec.nics or existing.spec.nics != cmd.spec.nics:
            return cmd
        return cmd.model_copy(update={"ports": list(existing.ports)})

    @staticmethod
    def _check_disk_change(
        existing: DomainRecord, spec: DomainSpec, bindings: StorageBindings
    ) -> None:
        """Disks are attached and detached by redefining a shut-off domain; a running
        machine keeps the disks it was started with, so a change is refused (`conflict`)."""
        if existing.state is PowerState.SHUTOFF:
            return
        if disk_layout(existing.spec, existing.bindings) != disk_layout(spec, bindings):
            raise ServiceError(
                "conflict",
                "disks can be attached or detached only while the domain is shut off "
                f"(state {existing.state.value})",
                {"state": existing.state.value, "action": Action.DEFINE.value, "field": "disks"},
            )

    def _check_ports(self, cmd: DefineDomain) -> None:
        """`invalid` unless the ports match the spec's NICs one to one and this host can
        plug them."""
        nics, ports = cmd.spec.nics, cmd.ports
        if len(ports) != len(nics):
            raise ServiceError(
                "invalid",
                f"{len(nics)} NIC(s) but {len(ports)} port(s): NICs get their ports from the "
                "network service (through the scheduler)",
                {"field": "ports"},
            )
        for i, (nic, port) in enumerate(zip(nics, ports, strict=True)):
            if port.network.name != nic.network or (nic.mac is not None and nic.mac != port.mac):
                raise ServiceError(
                    "invalid", f"port {i} is not for NIC {i} ({nic.network})", {"field": "ports"}
                )
        if not ports or self.networks is None:
            return
        try:
            self.networks.check(ports)
        except NetworkRefused as exc:
            raise ServiceError("invalid", str(exc), {"field": "nics"}) from None

    @handles(UndefineDomain)
    def undefine(self, cmd: UndefineDomain, ctx: Context) -> None:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            self._check(record, Action.UNDEFINE)
            # First, so a process kept by a preserve policy ends before its record goes.
            self._driver_call(lambda: self.driver.remove(cmd.domain_id))
            if record.managed_save is not None:
                self.states.delete(record.managed_save)
            if self.networks is not None and record.ports:
                # Best effort: a tap left behind is removed by the next reconcile (it is no
                # stored port's), while a domain that cannot be undefined is stuck for good.
                try:
                    self.networks.detach(record.ports)
                except Exception as exc:
                    log.warning("ports not unplugged", domain_id=str(cmd.domain_id), error=str(exc))
            self.claims.release(cmd.domain_id)
            self.store.undefine(
                cmd.domain_id,
                [
                    EventDraft(
                        DomainUndefined, record.state, UndefinedDetail.REMOVED, cause=ctx.cause
                    )
                ],
            )
            self.causes.forget(cmd.domain_id)

    @handles(StartDomain)
    def start(self, cmd: StartDomain, ctx: Context) -> DomainInfo:
        # Its expiry is checked once the domain's lock is held: a start whose sender gave up
        # while it waited there (or in the queue) does not run, so the clean-up the sender
        # sends then comes after a start that did begin, and no start can follow it.
        self.start_domain(
            cmd.domain_id, paused=cmd.paused, cause=ctx.cause, ctx=ctx, if_pending=cmd.if_pending
        )
        return self.info(cmd.domain_id)

    def start_domain(
        self,
        domain_id: uuid.UUID,
        *,
        paused: bool = False,
        cause: Cause | None = None,
        ctx: Context | None = None,
        if_pending: bool = False,
    ) -> None:
        """Start the domain's machine unless it runs already (the transition table decides),
        claiming its resources first and opening its boot files under the node's rule (the
        definer's role is kept with the definition) and its bound volumes and images in the
        node's pools. Used by `start` and by autostart at node
        start-up. Raises ServiceError: not_found, conflict, forbidden, invalid, no_capacity,
        or the driver's code; Expired if `ctx`'s command expired before the lock was held.
        `if_pending`: nothing is done unless the definition's create asked for a start that
        has not happened (StartDomain.if_pending)."""
        with self._lock(domain_id):
            if ctx is not None:
                ctx.check_expiry()
            record = self._record(domain_id)
            if if_pending and not record.start_pending:
                return
            if not self._check(record, Action.START):
                return
            if record.managed_save is not None:
                self.start_from_managed_save(record, paused=paused, cause=cause)
                return

            def boot(files: BootFiles, nics: list[NicTap]) -> None:
                self.driver.spawn(record.spec, files, paused=paused, nics=nics)

            self._launch(record, boot, cause, paused=paused)

    def _launch(
        self,
        record: DomainRecord,
        launch: Callable[[BootFiles, list[NicTap]], None],
        cause: Cause | None,
        *,
        paused: bool,
    ) -> None:
        """Start the domain's machine through `launch` (the driver's spawn or restore) as
        `_run_plumbed` says, its events caused by `cause`. The caller holds the domain's lock
        and has checked the transition."""
        steps = [{K.STARTED, K.FAILED}, *([{K.PAUSED}] if paused else [])]
        with self.causes.expecting(record.id, cause, *steps):
            self._run_plumbed(record, launch)

    def _run_plumbed(
        self,
        record: DomainRecord,
        launch: Callable[[BootFiles, list[NicTap]], T],
        *,
        check_locks: bool = True,
    ) -> T:
        """Open the domain's boot files and volumes (their locks checked unless
        `check_locks` is false), plug its ports and wait for their plumbing, claim its
        resources, and only then call `launch` with the files and taps (a VMM starts); its
        result. The claim is released if `launch` fails; the ports stay plugged (the
        caller's to unplug). ServiceError: the boot files' refusal, the plumbing's
        (`invalid`, `spawn_failed`), `no_capacity`, or the driver's code."""
        with refused():
            files = self.sources.open(record.spec, privileged=record.privileged)
        with files:
            with refused():
                self.storage.open(record.spec, record.bindings, files, check_locks=check_locks)
            nics, plumbed = self._plug(record)
            # The guest runs only once its ports are plumbed (networks applied, taps on
            # their bridges with their rules, remote ports' forwarding entries in): a frame
            # it sent before would be lost, as Nova waits for vif-plugged. The taps exist
            # already; a warm VMM starts in milliseconds after this.
            self._network_call(plumbed.result)
            self.claims.claim(record.spec)
            try:
                return launch(files, nics)
            except DriverError as exc:
                self.claims.release(record.id)
                raise ServiceError(exc.code, exc.message, {"host": self.host}) from None
            except BaseException:
                self.claims.release(record.id)
                raise

    def _plug(self, record: DomainRecord) -> tuple[list[NicTap], Future[object]]:
        """The domain's taps for its machine, and the rest of its ports' plumbing (their
        networks applied, rules, bridge, DHCP) under way: wait for it before the machine
        runs."""
        done: Future[object] = Future()
        done.set_result(None)
        if not record.ports:
            return [], done
        if self.networks is None:
            # A host without plumbing (the fake driver's): the driver gets the taps' names.
            return [NicTap(HostNetworks.tap_name(p), p.mac) for p in record.ports], done
        networks = self.networks
        found: list[tuple[list[NicTap], Future[object]]] = []
        self._network_call(lambda: found.append(networks.begin_attach(record.ports)))
        return found[0]

    @staticmethod
    def _network_call(call: Callable[[], object]) -> None:
        try:
            call()
        except NetworkRefused as exc:
            raise ServiceError("invalid", str(exc), {"field": "nics"}) from None
        except (PlumbingError, OSError) as exc:
            # A host that cannot plug may be fine elsewhere: the scheduler tries another.
            raise ServiceError("spawn_failed", f"network plumbing: {exc}") from None

    @handles(DestroyDomain)
    def destroy(self, cmd: DestroyDomain, ctx: Context) -> DomainInfo:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            if not self._check(record, Action.DESTROY):
                return self.info(cmd.domain_id)
            if record.state in (PowerState.SHUTOFF, PowerState.NOSTATE):
                self._end_kept(record)
            else:
                with self.causes.expecting(cmd.domain_id, ctx.cause, {K.STOPPED}):
                    self._destroy(record)
            return self.info(cmd.domain_id)

    def _end_kept(self, record: DomainRecord) -> None:
        """Destroy of a shut-off domain: end the process a preserve policy kept (no event:
        the machine was stopped already); `conflict` when there is none, as libvirt's."""
        try:
            self.driver.destroy(record.id)
        except DomainNotRunning:
            raise ServiceError(
                "conflict",
                f"domain is not running (state {record.state.value})",
                {"state": record.state.value, "action": Action.DESTROY.value},
            ) from None
        except DriverError as exc:
            raise ServiceError(exc.code, exc.message) from None
        self.claims.release(record.id)

    def _destroy(self, record: DomainRecord) -> None:
        try:
            self.driver.destroy(record.id)
        except DomainNotRunning:
            # A preserved or vanished machine: nothing left to stop but the record.
            self.on_guest_event(
                GuestEvent(record.id, record.driver_n + 1, GuestEventKind.STOPPED, "destroyed")
            )

    @handles(ShutdownDomain)
    def shutdown(self, cmd: ShutdownDomain, ctx: Context) -> DomainInfo:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            if not self._check(record, Action.SHUTDOWN):
                return self.info(cmd.domain_id)
            # The guest takes its time: the cause holds for the command's own time and more.
            with self.causes.expecting(
                cmd.domain_id,
                ctx.cause,
                {K.SHUTDOWN},
                {K.STOPPED, K.STARTED},  # STARTED: on_poweroff=restart
                within_s=cmd.timeout_s + 300.0,
            ):
                self._driver_call(lambda: self.driver.shutdown(cmd.domain_id, cmd.mode))
        if not cmd.wait:
            return self.info(cmd.domain_id)
        # Wait without the domain's lock, so a destroy can still cut a hung shutdown short.
        done = self.store.wait_for(cmd.domain_id, {PowerState.SHUTOFF}, cmd.timeout_s)
        if done is None and cmd.force:
            with self._lock(cmd.domain_id):
                record = self._record(cmd.domain_id)
                if record.state is not PowerState.SHUTOFF:
                    self._destroy(record)
        return self.info(cmd.domain_id)

    @handles(RebootDomain)
    def reboot(self, cmd: RebootDomain, ctx: Context) -> DomainInfo:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            action = Action.RESET if cmd.mode is RebootMode.RESET else Action.REBOOT
            if self._check(record, action):
                # A reset of a crashed domain starts it again: STARTED rather than REBOOTED.
                with self.causes.expecting(cmd.domain_id, ctx.cause, {K.REBOOTED, K.STARTED}):
                    self._driver_call(lambda: self.driver.reboot(cmd.domain_id, cmd.mode))
            return self.info(cmd.domain_id)

    @handles(PauseDomain)
    def pause(self, cmd: PauseDomain, ctx: Context) -> DomainInfo:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            if self._check(record, Action.PAUSE):
                with self.causes.expecting(cmd.domain_id, ctx.cause, {K.PAUSED}):
                    self._driver_call(lambda: self.driver.pause(cmd.domain_id))
            return self.info(cmd.domain_id)

    @handles(ResumeDomain)
    def resume(self, cmd: ResumeDomain, ctx: Context) -> DomainInfo:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            if self._check(record, Action.RESUME):
                with self.causes.expecting(cmd.domain_id, ctx.cause, {K.RESUMED}):
                    self._driver_call(lambda: self.driver.resume(cmd.domain_id))
            return self.info(cmd.domain_id)

    @handles(GetDomainInfo)
    def get_info(self, cmd: GetDomainInfo, _ctx: Context) -> DomainInfo:
        return self.info(cmd.domain_id)

    @handles(ListDomains)
    def list(self, cmd: ListDomains, _ctx: Context) -> DomainList:
        wanted = set(cmd.states) if cmd.states else None
        return DomainList(
            domains=[
                self.info(r.id) for r in self.store.all() if wanted is None or r.state in wanted
            ]
        )

    @handles(GetConsole)
    def console(self, cmd: GetConsole, _ctx: Context) -> ConsoleOutput:
        self._record(cmd.domain_id)
        data, truncated = self.driver.console(cmd.domain_id, cmd.max_bytes)
        return ConsoleOutput(
            domain_id=cmd.domain_id,
            data=data.decode("utf-8", "replace"),
            truncated=truncated,
        )

    def host_switch(self) -> tuple[bool, int]:
        """(enabled, generation), read together for a heartbeat."""
        with self._switch_lock:
            return self.enabled, self.enabled_generation

    @handles(SetHostEnabled)
    def set_enabled(self, cmd: SetHostEnabled, _ctx: Context) -> None:
        with self._switch_lock:
            if cmd.generation and cmd.generation < self.enabled_generation:
                # A switch asked before the one taken last, delivered late: it lost.
                log.info(
                    "stale host switch ignored",
                    generation=cmd.generation,
                    taken=self.enabled_generation,
                )
                return
            generation = cmd.generation or self.enabled_generation + 1
            reason = "" if cmd.enabled else cmd.reason
            self.store.set_setting(
                ENABLED_KEY,
                json.dumps({"enabled": cmd.enabled, "reason": reason, "generation": generation}),
            )
            self.enabled, self.disabled_reason = cmd.enabled, reason
            self.enabled_generation = generation
        self.switched()  # before the answer, so the schedulers hear it first
        log.info("host enabled" if cmd.enabled else "host disabled", reason=cmd.reason)

    @staticmethod
    def _driver_call(call: Callable[[], None]) -> None:
        try:
            call()
        except DriverError as exc:
            raise ServiceError(exc.code, exc.message) from None
