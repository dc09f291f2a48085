"""The source end of a migration between compute nodes (protos.migration, docs/migration.md
"The control plane: the compute node"), a part of compute_node.migrating.

`StartMigration` checks the state table (and refuses a second job), prepares the target,
answers the job and runs it on a thread: the driver streams the machine; its events become
SUSPENDED/MIGRATED, STOPPED/MIGRATED or RESUMED/MIGRATED; progress events go through the
outbox with the domain's current seq. On the commit the target is told to finish with the
last seq, the network service binds the ports to the target's vtep, the record goes without
an UNDEFINED; on a failure the target is told to forget the domain.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence

import structlog

from compute_node.driver import (
    DriverError,
    GuestEvent,
    GuestEventKind,
    IncomingMachine,
    MigrationOutcome,
    MigrationStats,
)
from compute_node.migration_base import PEER_TIMEOUT_S, MigrationBase
from compute_node.migration_jobs import KEPT_JOBS, Job, Jobs
from compute_node.migration_queue import MigrationQueue
from compute_node.store import DomainRecord
from compute_node.volume_copies import (
    abort_steps,
    commit_steps,
    copied_disks,
    disk_indices,
    prepare_copies,
)
from compute_node.volume_moves import local_disks, move_back, move_disks
from protos import routing
from protos.bindings import DiskBinding
from protos.domain import PowerState, TaskState
from protos.migration import (
    MIGRATION_PROGRESS_S,
    AbortMigration,
    FinishIncoming,
    GetMigrationJob,
    IncomingEndpoint,
    MigrationJob,
    MigrationPhase,
    PrepareIncoming,
    SetMigrationParams,
    StartMigration,
    TimeoutAction,
)
from protos.network import BindPorts
from protos.states import Action
from services.bus import Cause, Context, ServiceError, handles
from services.bus.cause import caused_by
from services.bus.errors import BusError, RemoteError

log = structlog.get_logger("flotilla.compute")
K = GuestEventKind
P = PowerState

FINISH_ATTEMPTS = 4  # FinishIncoming is idempotent by message id: resent on a lost answer
ABORT_WAIT_S = 5.0  # AbortMigration waits this long for the job to end before answering


class MigrationSource(MigrationBase):
    """Domains migrating away from this host: one job per domain."""

    def _init_source(self) -> None:
        self.jobs = Jobs(self.store)
        # At most this many jobs run at once (the node sets its max_concurrent_migrations).
        self.migration_queue: MigrationQueue[Job] = MigrationQueue(1)

    def _task(self, domain_id: uuid.UUID) -> TaskState:
        """The control plane's task on the domain here: `migrating` while a job runs."""
        return TaskState.MIGRATING if self.jobs.running(domain_id) else TaskState.NONE

    def _after_consumed(self, event: GuestEvent) -> None:
        """After the driver's event was consumed (sink lock held): a machine that migrated
        away with no job here to finish it (`_moved_away`)."""
        if (
            event.kind is K.STOPPED
            and event.reason == "migrated"
            and self.jobs.running(event.domain_id) is None
        ):
            self._moved_away(event.domain_id, event.n)

    def _moved_away(self, domain_id: uuid.UUID, n: int) -> None:
        """The driver's machine ended on a confirmed commit with no job here to finish it
        (this node restarted while its VMM streamed on): the target runs the guest, so the
        definition goes now (sink lock held), before anything can start it again here. The
        target adopts the domain by itself (no FinishIncoming comes)."""
        record = self.store.get(domain_id)
        if record is None or record.driver_n != n or record.state is not P.SHUTOFF:
            return  # not consumed just now (a replay), or not the machine's end
        log.warning(
            "the domain migrated away while no job knew of it: its definition here goes",
            domain_id=str(domain_id),
        )
        self._let_go(record)
        # Off the driver's delivery thread, which the driver's remove may wait for.
        threading.Thread(
            target=self._remove_leftovers, args=(domain_id,), name=f"moved-{domain_id}", daemon=True
        ).start()

    @handles(StartMigration)
    def migrate(self, cmd: StartMigration, ctx: Context) -> MigrationJob:
        domain_id, params = cmd.domain_id, cmd.params
        with self._lock(domain_id):
            record = self._record(domain_id)
            self._check(record, Action.MIGRATE)
            self._check_migratable(record, cmd.target, params.live)
            job = Job(domain_id, record.spec.name, self.host, cmd.target, params)
            job.cause = ctx.cause
            # Known before the target is asked: the target asks back while it waits.
            previous = self.jobs.add(job)
            if not self.migration_queue.admit(domain_id, job):
                # Over the limit: it waits here, holding nothing on the target, and says so
                # (kept in the store too, so a restart ends it rather than losing it).
                job.phase = MigrationPhase.QUEUED
                job.queue = self.migration_queue
                self.store.keep_job(job.snapshot(), limit=KEPT_JOBS)
                self._publish_progress(job)
                log.info(
                    "migration queued",
                    domain_id=str(domain_id),
                    target=cmd.target,
                    position=job.queue_position(),
                )
                return job.snapshot()
        try:
            self._launch_job(job, record)
        except BaseException:
            self.jobs.restore(job, previous)
            self._release_slot(domain_id)
            raise
        return job.snapshot()

    def _launch_job(self, job: Job, record: DomainRecord, *, announce: bool = False) -> None:
        """Prepare the target (a cold migration's host-local volumes moved there first, a
        live one's given empty files there) and start the job's thread; ServiceError with
        everything undone when the target or the storage service refuses, or the domain
        changed meanwhile. `announce` (a job that waited in the queue, whose StartMigration
        was answered long ago): a progress event says at which claim count the target took
        the domain, for the scheduler's claim there."""
        domain_id, params = job.domain_id, job.params
        # The target is asked without the domain's lock (an RPC: a VMM starts there; a cold
        # migration's host-local volumes move first): the job's `migrating` task refuses what
        # would change the domain meanwhile, except a destroy, which then leaves nothing to
        # migrate.
        disks = list(record.bindings.disks)
        try:
            if not params.live:
                # This host's volumes go first (the target's define finds them there).
                disks = move_disks(self._peer, disks, self.host, job.target)
                job.moved_disks = local_disks(record.bindings.disks, self.host)
            else:
                # This host's volumes get empty files there, which the stream fills.
                copies = copied_disks(record.spec, disks, self.host)
                disks = prepare_copies(
                    self._peer, disks, copies, job.target, self._abort_files(job.target)
                )
                job.copied_disks = copies
                job.copy_indices = disk_indices(record.spec, copies)
            endpoint = self._prepare_target(record, job.target, params.live, disks)
        except BaseException:
            move_back(self._peer, job.moved_disks, self.host)
            self._abort_copies(job, forgotten=False)
            raise
        with self._lock(domain_id):
            current = self.store.get(domain_id)
            if current is None or current.state is not record.state:
                self._forget_target(job)
                move_back(self._peer, job.moved_disks, self.host)
                raise ServiceError(
                    "conflict",
                    "the domain changed while its target was prepared: nothing migrated",
                    {"action": Action.MIGRATE.value},
                )
            job.target_vtep = endpoint.vtep
            job.target_claim_seq = endpoint.claim_seq
            was_paused = record.state is P.PAUSED
            if announce and job.target_claim_seq is not None:
                self._publish_progress(job)  # before the job's thread publishes any
        thread = threading.Thread(
            target=self._run_job,
            args=(job, endpoint, was_paused, job.cause),
            name=f"migrate-{domain_id}",
            daemon=True,
        )
        thread.start()
        log.info("migration started", domain_id=str(domain_id), target=job.target, live=params.live)

    def _release_slot(self, domain_id: uuid.UUID) -> None:
        """The domain's job ended or never ran: the jobs its slot goes to start, each on a
        thread of its own."""
        for next_id, job in self.migration_queue.release(domain_id):
            threading.Thread(
                target=self._start_queued, args=(job,), name=f"migrate-{next_id}", daemon=True
            ).start()

    def _start_queued(self, job: Job) -> None:
        """A queued job got its slot: checked again as a new one would be (the domain may
        have changed while it waited), then launched; a refusal now ends it `failed`
        with the reason (the scheduler's claim on the target goes with the final event)."""
        with caused_by(job.cause):
            try:
                self.store.drop_job(job.domain_id)  # running now: no job after a restart
                job.leave_queue()
                self._publish_progress(job)
                log.info("migration leaves the queue", domain_id=str(job.domain_id))
                with self._lock(job.domain_id):
                    record = self._record(job.domain_id)
                    self._check_migratable(record, job.target, job.params.live)
                self._launch_job(job, record, announce=True)
            except ServiceError as exc:
                self._ended(job, MigrationPhase.FAILED, exc.message)
            except Exception as exc:  # a bug must not leave the job queued for ever
                log.exception("queued migration not started", domain_id=str(job.domain_id))
                if not job.final:
                    self._ended(job, MigrationPhase.FAILED, f"internal error: {exc}")

    def end_queued_jobs(self) -> None:
        """At start-up: jobs that waited in the queue when this node stopped never ran; each
        ends `cancelled`, saying so (domjobinfo, and the final progress event that ends the
        domain's `migrating` task and releases the scheduler's claim on its target)."""
        for view in self.store.queued_jobs():
            error = (
                f"host {self.host} restarted while the migration waited in its queue: "
                "it never started (nothing moved)"
            )
            ended = view.model_copy(
                update={"phase": MigrationPhase.CANCELLED, "error": error, "queue_position": None}
            )
            self.jobs.keep(ended)
            record = self.store.get(view.domain_id)
            if record is not None:
                job = Job(view.domain_id, record.spec.name, self.host, view.target, view.params)
                job.started_at = view.started_at
                event = job.progress_event(
                    self.host, record.seq, record.state, (MigrationPhase.CANCELLED, error)
                )
                self.store.emit_unsequenced(event)
            log.warning("queued migration ended by the restart", domain_id=str(view.domain_id))

    def _check_migratable(self, record: DomainRecord, target: str, live: bool) -> None:
        if target == self.host:
            raise ServiceError(
                "invalid", "the target is the domain's own host", {"field": "target"}
            )
        if self.peer_call is None:
            raise ServiceError("unsupported", f"host {self.host} reaches no other hosts")
        active = record.state not in (P.SHUTOFF, P.NOSTATE)
        state = {"state": record.state.value, "action": Action.MIGRATE.value}
        if live and not active:
            raise ServiceError(
                "conflict", "domain is not running: migrate it with live false (cold)", state
            )
        if not live and active:
            raise ServiceError(
                "conflict", "domain is active: migrate it live, or shut it off first", state
            )
        if live and not self.driver.capabilities().live_migration:
            raise ServiceError("unsupported", f"host {self.host} cannot live-migrate")
        if record.managed_save is not None:
            raise ServiceError(
                "conflict",
                "domain has a managed save on this host: start it, or remove the managed save",
                state,
            )
        # A writable host file (an admin's path disk) is this host's alone. (A `dir` pool's
        # volume moves: copied by a live migration's stream, moved first by a cold one.)
        files = [d.target for d in record.spec.disks if d.path is not None and not d.readonly]
        images = [
            r for r in (record.bindings.kernel_image, record.bindings.initrd_image) if r is not None
        ]
        if files:
            raise ServiceError(
                "invalid",
                f"disk(s) {', '.join(files)} are writable host files, which stay on this host: "
                "only volumes move with a domain",
                {"field": "disks"},
            )
        if any(r.host is not None for r in images):
            raise ServiceError(
                "invalid",
                "the boot image is in a host-local pool: import it to a shared pool first",
                {"field": "boot.image"},
            )

    def _prepare_target(
        self, record: DomainRecord, target: str, live: bool, disks: list[DiskBinding]
    ) -> IncomingEndpoint:
        prepare = PrepareIncoming(
            spec=record.spec,
            source=self.host,
            live=live,
            paused=record.state is P.PAUSED,
            privileged=record.privileged,
            disks=disks,
            kernel_image=record.bindings.kernel_image,
            initrd_image=record.bindings.initrd_image,
            ports=list(record.ports),
            seq=record.seq,
        )
        try:
            reply = self._peer(routing.compute_queue(target), prepare)
        except RemoteError as exc:
            details = {**exc.details, "target": target}
            raise ServiceError(exc.code, f"target {target}: {exc.message}", details) from None
        except BusError as exc:
            # It may have prepared before the answer was lost: have it forget the domain.
            self._forget_later(target, record.id)
            raise ServiceError(
                "unavailable", f"target {target} did not answer: {exc}", {"target": target}
            ) from None
        assert isinstance(reply, IncomingEndpoint)
        if live and (reply.address is None or reply.port is None or reply.token is None):
            self._forget_later(target, record.id)
            raise ServiceError("internal", f"target {target} gave no stream endpoint")
        return reply

    # ---- the job thread ----------------------------------------------------------------------

    def _run_job(
        self, job: Job, endpoint: IncomingEndpoint, was_paused: bool, cause: Cause | None
    ) -> None:
        try:
            # Its calls and events carry the StartMigration's cause (one correlation id).
            with caused_by(cause):
                if job.params.live:
                    self._run_live(job, endpoint, was_paused, cause)
                else:
                    self._run_cold(job)
        except Exception as exc:  # a bug must not leave the job running for ever
            log.exception("migration job failed", domain_id=str(job.domain_id))
            if not job.final:
                self._forget_target(job)
                self._ended(job, MigrationPhase.FAILED, f"internal error: {exc}")

    def _run_live(
        self, job: Job, endpoint: IncomingEndpoint, was_paused: bool, cause: Cause | None
    ) -> None:
        domain_id = job.domain_id
        within_s = (job.params.timeout_s or 86_400.0) + 60.0
        self.causes.expect(domain_id, cause, {K.PAUSED}, {K.STOPPED, K.RESUMED}, within_s=within_s)
        # A target of an older release names no stream version: it speaks version 1.
        target = IncomingMachine(
            str(endpoint.address),
            int(endpoint.port or 0),
            str(endpoint.token),
            endpoint.stream_version or 1,
        )
        if job.aborted:  # asked while the target was prepared: the driver had nothing yet
            self.causes.forget(domain_id)
            self._forget_target(job)
            self._ended(job, MigrationPhase.CANCELLED)
            return
        timer = self._timeout_timer(job)
        try:
            outcome = self.driver.migrate_out(
                domain_id,
                target,
                job.params,
                self._progress(job),
                copy_disks=job.copy_indices,
            )
        except DriverError as exc:
            if exc.code == "migration_unconfirmed":
                self._unconfirmed(job, exc.message, was_paused)
                return
            outcome = MigrationOutcome(
                committed=False, phase="failed", stats=job.stats, error=exc.message
            )
        finally:
            if timer is not None:
                timer.cancel()
            self.causes.forget(domain_id)
        job.update(outcome.stats)
        job.downtime_ms, job.paused_ms = outcome.downtime_ms, outcome.paused_ms
        if outcome.committed:
            # A `pause` timeout leaves the guest paused at the target also where the driver
            # met it by pausing for the last pages itself (it refuses a pause mid-stream).
            pause_timeout = job.timed_out and job.params.timeout_action is TimeoutAction.PAUSE
            self._committed(job, paused=was_paused or job.paused_by_timeout or pause_timeout)
            return
        # The source runs on: the target forgets the domain when it gets this (it waits in
        # its queue if the target is down; a restarted target forgets it by itself too).
        self._forget_target(job)
        phase = MigrationPhase.CANCELLED if outcome.phase == "cancelled" else MigrationPhase.FAILED
        error = outcome.error
        if job.timed_out:
            error = f"timed out after {job.params.timeout_s:g} s ({error})"
        self._ended(job, phase, error)

    def _run_cold(self, job: Job) -> None:
        with self._lock(job.domain_id):
            record = self.store.get(job.domain_id)
            if record is None or job.aborted:
                self._finish_target(job, committed=False, seq=0)
                move_back(self._peer, job.moved_disks, self.host)
                self._ended(
                    job,
                    MigrationPhase.CANCELLED if job.aborted else MigrationPhase.FAILED,
                    None if job.aborted else "the domain is gone",
                )
                return
            job.phase = MigrationPhase.COMMIT
            committed = self._finish_target(job, committed=True, seq=record.seq)
            # Not confirmed: undone, unless the target answers that it did commit after all
            # (the answer to the commit was lost). Unanswered twice: the source keeps it.
            if not committed and not self._finish_target(job, committed=False, seq=0):
                move_back(self._peer, job.moved_disks, self.host)
                self._ended(job, MigrationPhase.FAILED, job.error or "the target did not commit")
                return
            self._ended(job, MigrationPhase.DONE)
            self._drop(job)

    def _timeout_timer(self, job: Job) -> threading.Timer | None:
        if job.params.timeout_s is None:
            return None

        def expire() -> None:
            if job.final:
                return
            job.timed_out = True
            if job.params.timeout_action is TimeoutAction.PAUSE:
                log.info("migration timed out: pausing the guest", domain_id=str(job.domain_id))
                try:
                    self.driver.pause(job.domain_id)
                    job.paused_by_timeout = True
                except DriverError as exc:
                    log.warning("guest not paused", domain_id=str(job.domain_id), error=str(exc))
            else:
                log.info("migration timed out: aborting", domain_id=str(job.domain_id))
                self.driver.migration_cancel(job.domain_id)

        timer = threading.Timer(job.params.timeout_s, expire)
        timer.daemon = True
        timer.start()
        return timer

    def _progress(self, job: Job) -> Callable[[MigrationStats], None]:
        def report(stats: MigrationStats) -> None:
            job.update(stats)
            if job.aborted:  # an abort that came before the driver's stream could take it
                self.driver.migration_cancel(job.domain_id)
            now = time.monotonic()
            if now - job.published >= MIGRATION_PROGRESS_S:  # whatever the driver's pace
                job.published = now
                self._publish_progress(job)

        return report

    def _publish_progress(
        self, job: Job, final: tuple[MigrationPhase, str | None] | None = None
    ) -> None:
        record = self.store.get(job.domain_id)
        if record is None:
            return
        event = job.progress_event(self.host, record.seq, record.state, final)
        self.store.emit_unsequenced(event, job.cause)

    def _committed(self, job: Job, *, paused: bool) -> None:
        """The target runs the guest: tell it the last seq, move the ports, drop the record."""
        record = self.store.get(job.domain_id)
        seq = record.seq if record is not None else 0
        self._finish_target(job, committed=True, seq=seq, state=P.PAUSED if paused else P.RUNNING)
        self._bind_ports(job, record)
        # The source's machine ended with the commit (its VMM is gone): the catalog names
        # the target for the copied volumes, and their files here go. The steps are on disk
        # before the job is done, and resent until the catalog answers, however long the
        # storage service is away; the job waits for one short attempt only.
        if job.copied_disks:
            rows = self.storage_steps.add(commit_steps(job.copied_disks, job.target))
            self.storage_steps.send_now(rows)
        # The machine here ended with the commit: its room is free before the job is done
        # (the heartbeat saying so goes out ahead of the final progress event).
        self.claims.release(job.domain_id)
        self._ended(job, MigrationPhase.DONE)
        with self._lock(job.domain_id):
            self._drop(job)

    def _unconfirmed(self, job: Job, error: str, was_paused: bool) -> None:
        """The commit was sent and no answer came: the source's machine waits paused. The
        target says whether it runs the guest (then the source's machine ends) or not (then
        it runs on here)."""
        domain_id = job.domain_id
        runs_there = self._finish_target(job, committed=False, seq=0)
        if runs_there is None:
            self._ended(
                job,
                MigrationPhase.FAILED,
                f"{error}; the target did not answer: the guest stays paused here, and the "
                "target adopts it if it runs there",
            )
            return
        record = self.store.get(domain_id)
        if runs_there:
            if record is not None:
                stopped = GuestEvent(domain_id, record.driver_n + 1, K.STOPPED, "migrated")
                self.on_guest_event(stopped)
            try:
                self.driver.destroy(domain_id)
            except DriverError:
                pass
            self._committed(job, paused=was_paused)
            return
        if not was_paused:
            try:
                self.driver.resume(domain_id)
            except DriverError as exc:
                log.warning("guest not resumed", domain_id=str(domain_id), error=str(exc))
        self._abort_copies(job, forgotten=True)
        self._ended(job, MigrationPhase.FAILED, error)

    def _finish_target(
        self, job: Job, *, committed: bool, seq: int, state: PowerState | None = None
    ) -> bool | None:
        """Send FinishIncoming (resent with the same id while no answer comes). Returns True
        when the domain runs (or is committed) on the target, False when the target forgot
        it, None when the target never answered."""
        command = FinishIncoming(domain_id=job.domain_id, committed=committed, seq=seq, state=state)
        queue = routing.compute_queue(job.target)
        message_id = str(uuid.uuid4())
        for _ in range(FINISH_ATTEMPTS):
            try:
                assert self.peer_call is not None
                self.peer_call(queue, command, PEER_TIMEOUT_S / 2, message_id)
            except RemoteError as exc:
                if exc.details.get("committed") is True:
                    return True
                job.error = f"target {job.target}: {exc.message}"
                log.warning("finish refused", domain_id=str(job.domain_id), error=exc.message)
                return False
            except BusError as exc:
                log.warning("finish unanswered", domain_id=str(job.domain_id), error=str(exc))
                continue
            return committed
        return None

    def _forget_target(self, job: Job) -> None:
        """The target forgets the domain; copied volumes' files there go once it has (its
        VMM closed them). Without copies the FinishIncoming is sent on another thread."""
        if not job.copied_disks:
            self._forget_later(job.target, job.domain_id)
            return
        self._abort_copies(job, forgotten=False)

    def _abort_copies(self, job: Job, *, forgotten: bool) -> None:
        """The target's files of the copied volumes go (the volumes stay here), once the
        target has forgotten the domain (`forgotten`: it has); kept if it runs the guest
        after all or never answered (the volume's lease keeps it from other operations)."""
        if not job.copied_disks:
            return
        if not forgotten:
            runs_there = self._finish_target(job, committed=False, seq=0)
            if runs_there is not False:
                log.warning(
                    "copied volumes kept on the target",
                    domain_id=str(job.domain_id),
                    target=job.target,
                    runs_there=runs_there,
                )
                return
        self._abort_files(job.target)(job.copied_disks)
        job.copied_disks = []

    def _abort_files(self, target: str) -> Callable[[Sequence[DiskBinding]], None]:
        """Removes the target's files of the given copies: the steps are on disk first, then
        tried once now; what is left is resent until the catalog answers."""

        def abort(copies: Sequence[DiskBinding]) -> None:
            if copies:
                self.storage_steps.send_now(self.storage_steps.add(abort_steps(copies, target)))

        return abort

    def _forget_later(self, target: str, domain_id: uuid.UUID) -> None:
        """FinishIncoming(committed=false) to `target` on another thread: if the target is
        down it waits in its queue (and a restarted target forgets the domain anyway)."""
        command = FinishIncoming(domain_id=domain_id, committed=False, seq=0)

        def send() -> None:
            try:
                self._peer(routing.compute_queue(target), command)
            except BusError as exc:
                log.warning("finish unanswered", domain_id=str(domain_id), error=str(exc))

        threading.Thread(target=send, daemon=True).start()

    def _bind_ports(self, job: Job, record: DomainRecord | None) -> None:
        if record is None or not record.ports:
            return
        try:
            self._peer(
                routing.NETWORK_QUEUE,
                BindPorts(domain_id=job.domain_id, host=job.target, vtep=job.target_vtep),
            )
        except BusError as exc:
            log.warning(
                "ports not bound to the target", domain_id=str(job.domain_id), error=str(exc)
            )

    def _ended(self, job: Job, phase: MigrationPhase, error: str | None = None) -> None:
        """The final progress event, then the job's end (whoever waits for it sees both)."""
        self._publish_progress(job, (phase, error))
        job.end(phase, error, keep=self.jobs.keep)
        self._release_slot(job.domain_id)
        log.info(
            "migration ended",
            domain_id=str(job.domain_id),
            target=job.target,
            phase=phase.value,
            downtime_ms=job.downtime_ms,
            error=error,
        )

    def _drop(self, job: Job) -> None:
        """The domain lives on the target now: its record here goes, with no event."""
        record = self.store.get(job.domain_id)
        if record is None:
            return
        self._let_go(record)
        self._remove_leftovers(job.domain_id)

    # ---- job commands ----------------------------------------------------------------------

    def _not_found(self, domain_id: uuid.UUID) -> ServiceError:
        return ServiceError("not_found", f"domain {domain_id} never migrated from host {self.host}")

    @handles(GetMigrationJob)
    def migration_job(self, cmd: GetMigrationJob, _ctx: Context) -> MigrationJob:
        last = self.jobs.last(cmd.domain_id)
        if last is None:
            raise self._not_found(cmd.domain_id)
        return last

    @handles(AbortMigration)
    def migration_abort(self, cmd: AbortMigration, _ctx: Context) -> MigrationJob:
        job = self.jobs.get(cmd.domain_id)
        last = job.snapshot() if job is not None else self.jobs.last(cmd.domain_id)
        if last is None:
            raise self._not_found(cmd.domain_id)
        if last.phase is MigrationPhase.DONE or last.phase is MigrationPhase.COMMIT:
            raise ServiceError(
                "conflict",
                "the migration has committed: too late to abort it",
                {"reason": "committed", "phase": last.phase.value},
            )
        if job is None or job.final:
            return last
        if job.phase is MigrationPhase.QUEUED and self.migration_queue.withdraw(job.domain_id):
            # It never ran: nothing to undo, no target prepared.
            self._ended(job, MigrationPhase.CANCELLED, "cancelled while queued: it never ran")
            return job.snapshot()
        job.aborted = True
        self.driver.migration_cancel(cmd.domain_id)
        job.ended.wait(ABORT_WAIT_S)
        return job.snapshot()

    @handles(SetMigrationParams)
    def migration_set(self, cmd: SetMigrationParams, _ctx: Context) -> MigrationJob:
        job = self.jobs.running(cmd.domain_id)
        if job is None or not job.params.live:
            raise ServiceError(
                "conflict", f"no live migration of domain {cmd.domain_id} runs on {self.host}"
            )
        try:
            self.driver.migration_set(
                cmd.domain_id,
                max_downtime_ms=cmd.max_downtime_ms,
                bandwidth_mibps=cmd.bandwidth_mibps,
            )
        except DriverError as exc:
            raise ServiceError(exc.code, exc.message) from None
        update: dict[str, object] = {}
        if cmd.max_downtime_ms is not None:
            update["max_downtime_ms"] = cmd.max_downtime_ms
        if cmd.bandwidth_mibps is not None:
            update["bandwidth_mibps"] = cmd.bandwidth_mibps
        job.params = job.params.model_copy(update=update)
        return job.snapshot()
