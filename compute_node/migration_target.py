"""The target end of a migration between compute nodes (protos.migration, docs/migration.md
"The control plane: the compute node"), a part of compute_node.migrating.

`PrepareIncoming` stores the domain as `incoming` (compute_node.store: not listed, no events,
refused by every other command as `not_found`), checks its boot files, storage and ports as
DefineDomain does and, for a live migration, claims its resources, plugs its ports and has
the driver wait for the stream. The driver's events of an incoming domain are held until
`FinishIncoming`: committed, the record takes the source's last seq and the held events
follow it (STARTED/MIGRATED, SUSPENDED/MIGRATED); not committed, everything is undone. A
machine that runs without any FinishIncoming within `incoming_adopt_s` (its source died after
the commit) is adopted with the prepare's seq + 2 (the source's SUSPENDED and STOPPED; + 1
when the guest was paused already: no SUSPENDED).
"""

from __future__ import annotations

import threading
import time
import uuid
from ipaddress import IPv4Address

import structlog

from compute_node.boot_sources import BootFiles
from compute_node.driver import (
    DriverError,
    GuestEvent,
    GuestEventKind,
    IncomingMachine,
    NicTap,
)
from compute_node.launching import refused
from compute_node.migration_base import MigrationBase
from compute_node.storage_sources import StorageBindings
from compute_node.store import DomainRecord, EventDraft, Incoming, NameTaken
from compute_node.volume_copies import abort_steps, commit_steps, disk_indices
from protos import routing
from protos.commands import DefineDomain
from protos.domain import PowerState
from protos.events import DefinedDetail, DomainDefined
from protos.migration import (
    FinishIncoming,
    GetMigrationJob,
    IncomingEndpoint,
    MigrationJob,
    MigrationPhase,
    PrepareIncoming,
)
from services.bus import Cause, Context, ServiceError, handles
from services.bus.errors import BusError, RemoteError

log = structlog.get_logger("flotilla.compute")
K = GuestEventKind
P = PowerState

STARTED_WAIT_S = 10.0  # a commit that must pause the guest waits this long for its start


class MigrationTarget(MigrationBase):
    """Domains migrating in to this host."""

    def _init_target(self) -> None:
        # Where incoming streams are listened for, and this host's VXLAN address.
        self.migration_listen = "127.0.0.1"
        self.vtep: IPv4Address | None = None
        # How long a machine that runs may wait for its FinishIncoming before it is adopted,
        # and how often a domain migrating in asks its source whether the job still runs.
        self.incoming_adopt_s = 30.0
        self.incoming_check_s = 10.0
        self._held: dict[uuid.UUID, list[GuestEvent]] = {}
        self._adopt_timers: dict[uuid.UUID, threading.Timer] = {}
        self._stopping = threading.Event()

    def stop_migrations(self) -> None:
        """Before the store closes: the watches of domains migrating in end (the adoption
        timers with them); running jobs are the driver's to end."""
        self._stopping.set()
        with self._sink_lock:
            for timer in self._adopt_timers.values():
                timer.cancel()

    def _hold(self, event: GuestEvent) -> bool:
        """Hold the event of a domain migrating in until its FinishIncoming (sink lock
        held); False for any other domain's."""
        progress = self.store.progress(event.domain_id)
        if progress is None or not progress.migrating_in:
            return False
        self._held.setdefault(event.domain_id, []).append(event)
        if event.kind is K.STARTED:
            self._arm_adoption(event.domain_id)
        return True

    def _arm_adoption(self, domain_id: uuid.UUID) -> None:
        if domain_id in self._adopt_timers:
            return
        timer = threading.Timer(self.incoming_adopt_s, self._adopt_orphan, (domain_id,))
        timer.daemon = True
        self._adopt_timers[domain_id] = timer
        timer.start()

    def _disarm_adoption(self, domain_id: uuid.UUID) -> None:
        timer = self._adopt_timers.pop(domain_id, None)
        if timer is not None:
            timer.cancel()

    def _adopt_orphan(self, domain_id: uuid.UUID) -> None:
        """No FinishIncoming came for a machine that runs: its source committed and died."""
        with self._lock(domain_id):
            record = self.store.get(domain_id)
            if record is None or record.incoming is None:
                return
            incoming = record.incoming
            seq = incoming.seq + (1 if incoming.paused else 2)
            log.warning(
                "adopted a migrated domain whose source never finished the migration",
                domain_id=str(domain_id),
                source=incoming.source,
                seq=seq,
            )
            self._commit_incoming(record, seq, None, None)
        self._settle_copies(record, commit=True)

    def _settle_copies(self, record: DomainRecord, *, commit: bool) -> None:
        """A live migration in whose source will not settle its copied volumes (it died, or
        restarted and knows no job): this node commits them (it runs the guest) or aborts
        them (forgotten, its VMM gone), on another thread. Resent by both ends, a step is
        answered as it is."""
        incoming = record.incoming
        copies = [d for d in record.bindings.disks if d.host == self.host]
        if incoming is None or not incoming.live or not copies or self.peer_call is None:
            return
        # Kept until the catalog answers, across restarts too; sent by the steps' thread.
        steps = commit_steps if commit else abort_steps
        self.storage_steps.add(steps(copies, self.host))
        self.storage_steps.wake()

    @handles(PrepareIncoming)
    def prepare_incoming(self, cmd: PrepareIncoming, _ctx: Context) -> IncomingEndpoint:
        spec = cmd.spec
        bindings = StorageBindings(
            disks=tuple(cmd.disks), kernel_image=cmd.kernel_image, initrd_image=cmd.initrd_image
        )
        ports = tuple(cmd.ports)
        with refused():
            self.sources.check(spec, privileged=cmd.privileged)
            self.storage.exist(spec, bindings)
        self._check_ports(DefineDomain(spec=spec, ports=list(ports)))
        if cmd.live and not self.driver.capabilities().live_migration:
            raise ServiceError("unsupported", f"host {self.host} cannot take live migrations")
        with self._lock(spec.uuid):
            incoming = Incoming(cmd.source, cmd.live, cmd.paused, cmd.seq)
            try:
                record = self.store.define_incoming(
                    spec, incoming, privileged=cmd.privileged, bindings=bindings, ports=ports
                )
            except KeyError:
                raise ServiceError(
                    "conflict",
                    f"domain {spec.uuid} is defined on host {self.host} already",
                    {"host": self.host},
                ) from None
            except NameTaken as exc:
                raise ServiceError("conflict", str(exc), {"name": spec.name}) from None
            endpoint = IncomingEndpoint(domain_id=spec.uuid, host=self.host, vtep=self.vtep)
            if not cmd.live:
                self._watch_incoming(spec.uuid, cmd.source)
                return endpoint
            try:
                machine = self._wait_for_stream(record, paused=cmd.paused)
            except BaseException:
                self.store.forget(spec.uuid)
                raise
            log.info("migration incoming", domain_id=str(spec.uuid), source=cmd.source)
            self._watch_incoming(spec.uuid, cmd.source)
            return endpoint.model_copy(
                update={
                    "address": IPv4Address(machine.address),
                    "port": machine.port,
                    "token": machine.token,
                    "stream_version": machine.stream_version,
                    "claim_seq": self.claims.claimed_at(spec.uuid),
                }
            )

    def _watch_incoming(self, domain_id: uuid.UUID, source: str) -> None:
        """Until the domain's machine runs here (then the adoption timer decides) or it is
        finished, ask its source every `incoming_check_s` whether the job still runs: a
        source that ended it (failed, cancelled), knows of none (it restarted) or whose job
        goes to another host will send no FinishIncoming, so the domain is forgotten here."""
        if self.peer_call is None:
            return

        def watch() -> None:
            try:
                check()
            except Exception:
                if not self._stopping.is_set():  # else: the store closed under it
                    log.exception("watch of a domain migrating in failed", domain_id=str(domain_id))

        def check() -> None:
            while not self._stopping.wait(self.incoming_check_s):
                if not self._waiting_for_stream(domain_id):
                    return
                try:
                    job = self._peer(
                        routing.compute_queue(source), GetMigrationJob(domain_id=domain_id)
                    )
                except RemoteError as exc:
                    gone = exc.code == "not_found"
                except BusError:
                    continue  # the source is unreachable: it may come back
                else:
                    assert isinstance(job, MigrationJob)
                    # A job to another host is not this one: no FinishIncoming comes here.
                    gone = job.target != self.host or job.phase in (
                        MigrationPhase.FAILED,
                        MigrationPhase.CANCELLED,
                    )
                if gone:
                    self._forget_orphan(domain_id, source)
                    return

        threading.Thread(target=watch, name=f"incoming-{domain_id}", daemon=True).start()

    def _waiting_for_stream(self, domain_id: uuid.UUID) -> bool:
        record = self.store.get(domain_id)
        with self._sink_lock:
            return (
                record is not None
                and record.incoming is not None
                and domain_id not in self._adopt_timers
            )

    def _forget_orphan(self, domain_id: uuid.UUID, source: str) -> None:
        with self._lock(domain_id):
            record = self.store.get(domain_id)
            if record is None or not self._waiting_for_stream(domain_id):
                return
            try:
                self._abandon_incoming(record)
            except ServiceError:
                return  # it runs here after all: the adoption timer has it
            self._settle_copies(record, commit=False)
            log.warning(
                "forgot a domain migrating in: its source runs no such migration",
                domain_id=str(domain_id),
                source=source,
            )

    def _wait_for_stream(self, record: DomainRecord, *, paused: bool) -> IncomingMachine:
        """Open the domain's files, plug its ports and wait for their plumbing, claim its
        resources and only then have the driver wait for the stream (its VMM starts), as a
        start does (`_run_plumbed`); everything undone if any of it fails."""
        # Not the volume locks: the source's VMM holds them until it is paused for the last
        # pages, and the target's VMM takes them over then (docs/storage.md). A live
        # migration's volumes on this host's pools are copies the stream fills (the
        # source's pools are not shared with this host).
        copies = [d for d in record.bindings.disks if d.host == self.host]

        def listen(files: BootFiles, nics: list[NicTap]) -> IncomingMachine:
            return self.driver.prepare_incoming(
                record.spec,
                files,
                nics=nics,
                listen=self.migration_listen,
                paused=paused,
                copy_disks=disk_indices(record.spec, copies),
            )

        try:
            return self._run_plumbed(record, listen, check_locks=False)
        except BaseException:
            self._unplug(record)
            raise

    @handles(FinishIncoming)
    def finish_incoming(self, cmd: FinishIncoming, ctx: Context) -> None:
        with self._lock(cmd.domain_id):
            record = self.store.get(cmd.domain_id)
            if record is None:
                return  # never prepared, or forgotten already
            if record.incoming is None:
                if cmd.committed:
                    return  # finished already (or adopted)
                raise ServiceError(
                    "conflict",
                    f"domain {cmd.domain_id} runs on host {self.host}: its migration committed",
                    {"committed": True, "host": self.host},
                )
            if cmd.committed:
                self._commit_incoming(record, cmd.seq, cmd.state, ctx.cause)
            else:
                self._abandon_incoming(record)

    def _commit_incoming(
        self, record: DomainRecord, seq: int, state: PowerState | None, cause: Cause | None
    ) -> None:
        """The domain is this host's from `seq` on: its held events follow (lock held)."""
        assert record.incoming is not None
        domain_id = record.id
        live = record.incoming.live
        with self._sink_lock:
            drafts = (
                []
                if live
                else [EventDraft(DomainDefined, P.SHUTOFF, DefinedDetail.MIGRATED, cause=cause)]
            )
            self.store.finish_incoming(domain_id, seq, drafts)
            self._disarm_adoption(domain_id)
            if live:  # the machine's first events here are the migration's
                self.causes.expect(domain_id, cause, {K.STARTED}, {K.PAUSED}, within_s=60.0)
            for event in self._held.pop(domain_id, []):
                self._consume(event)
        log.info("migration committed here", domain_id=str(domain_id), seq=seq, live=live)
        current = self._reported_started(domain_id) if live and state is P.PAUSED else None
        if current is not None and current.state is P.RUNNING:
            # Paused at the source after the stream had the machine's power state.
            try:
                self.driver.pause(domain_id)
            except DriverError as exc:
                log.warning("migrated guest not paused", domain_id=str(domain_id), error=str(exc))

    def _reported_started(self, domain_id: uuid.UUID) -> DomainRecord | None:
        """The record once the driver reported the migrated machine's start (its events may
        come after the source's FinishIncoming); None if that takes over STARTED_WAIT_S."""
        deadline = time.monotonic() + STARTED_WAIT_S
        while True:
            current = self.store.get(domain_id)
            if current is None or current.state not in (P.SHUTOFF, P.NOSTATE):
                return current
            if time.monotonic() >= deadline:
                log.warning(
                    "the migrated machine's start was not reported", domain_id=str(domain_id)
                )
                return None
            time.sleep(0.01)

    def _abandon_incoming(self, record: DomainRecord) -> None:
        """Undo a PrepareIncoming (lock held): end the waiting machine, unplug, release."""
        domain_id = record.id
        try:
            self.driver.cancel_incoming(domain_id)
        except DriverError as exc:
            if exc.code == "conflict":
                raise ServiceError(
                    "conflict",
                    f"domain {domain_id} already runs on host {self.host}",
                    {"committed": True, "host": self.host},
                ) from None
            raise ServiceError(exc.code, exc.message) from None
        self._unplug(record)
        self.claims.release(domain_id)
        with self._sink_lock:
            self.store.forget(domain_id)
            self._held.pop(domain_id, None)
            self._disarm_adoption(domain_id)
        log.info("migration abandoned here", domain_id=str(domain_id))

    def recover_incoming(self) -> None:
        """At start-up: a domain migrating in whose machine is gone is forgotten (its source
        runs it on); one whose machine runs is held and adopted as the timer says, unless its
        FinishIncoming arrives (it waits in this node's queue)."""
        for record in self.store.incoming():
            runtime = None
            if record.incoming is not None and record.incoming.live:
                runtime = self.driver.adopt(record.id, record.driver_n)
            if runtime is not None and runtime.state is not P.SHUTOFF:
                self.claims.hold(record.spec)
                self._arm_adoption(record.id)
                continue
            with self._lock(record.id):
                try:
                    self._abandon_incoming(record)
                    self._settle_copies(record, commit=False)
                except ServiceError as exc:
                    if exc.details.get("committed") is not True:
                        log.warning(
                            "a domain migrating in was not undone",
                            domain_id=str(record.id),
                            error=exc.message,
                        )
                        continue
                    # The stream committed as this node came back: the guest runs here.
                    self.claims.hold(record.spec)
                    with self._sink_lock:
                        self._arm_adoption(record.id)
