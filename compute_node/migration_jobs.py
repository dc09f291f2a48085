"""A migration job as the source node keeps it (compute_node.migration_source): what it
reports (protos.migration.MigrationJob, the `domain.migration_progress` events) and what asks
it to stop. The node keeps each domain's current or last job in memory (`Jobs`), and the last
ended one in its store too, so that it is still answered after a restart."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from compute_node.driver import MigrationStats
from protos.bindings import DiskBinding
from protos.domain import PowerState
from protos.events import DomainMigrationProgress
from protos.migration import FINAL_PHASES, MigrationJob, MigrationParams, MigrationPhase
from services.bus.cause import Cause

if TYPE_CHECKING:
    from compute_node.migration_queue import MigrationQueue
    from compute_node.store import Store

KEPT_JOBS = 256  # the last jobs kept for GetMigrationJob, the oldest ended ones dropped first


@dataclass
class Job:
    domain_id: uuid.UUID
    name: str
    source: str
    target: str
    params: MigrationParams
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    phase: MigrationPhase = MigrationPhase.PREPARING
    stats: MigrationStats = field(default_factory=lambda: MigrationStats(phase="preparing"))
    downtime_ms: float | None = None
    paused_ms: float | None = None
    error: str | None = None
    aborted: bool = False  # AbortMigration asked
    timed_out: bool = False  # timeout_s passed
    paused_by_timeout: bool = False  # and the guest was paused for it (timeout_action pause)
    target_vtep: IPv4Address | None = None  # where the ports' VXLAN entries go at the commit
    # The target's claim count at which it took the domain (IncomingEndpoint.claim_seq).
    target_claim_seq: int | None = None
    published: float = float("-inf")  # when the last progress event went out (monotonic)
    cause: Cause | None = None  # the StartMigration's: its events and calls carry it
    ended: threading.Event = field(default_factory=threading.Event)
    finished: float | None = None  # when it ended (monotonic)
    moved_disks: list[DiskBinding] = field(default_factory=list)  # cold: volumes moved
    copied_disks: list[DiskBinding] = field(default_factory=list)  # live: volumes copied
    copy_indices: list[int] = field(default_factory=list)  # ... their machine disk slots
    # The source's queue while the job waits in it (phase QUEUED): its place is read there.
    queue: MigrationQueue[Job] | None = None

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    def update(self, stats: MigrationStats) -> None:
        self.stats = stats
        try:
            phase = MigrationPhase(stats.phase)
        except ValueError:
            return  # a driver's phase of its own: the figures still count
        if phase not in FINAL_PHASES:  # the job ends by `end`, once its target knows
            self.phase = phase

    def end(
        self,
        phase: MigrationPhase,
        error: str | None = None,
        keep: Callable[[MigrationJob], None] | None = None,
    ) -> None:
        """End the job; `keep` gets its final view before anyone can see it ended."""
        self.finished = time.monotonic()
        if keep is not None:
            keep(self._view(phase, error))
        self.phase = phase
        self.error = error
        self.ended.set()

    def leave_queue(self) -> None:
        """The job got its slot: it is PREPARING from now on, and its figures (`started_at`,
        `elapsed_ms`, the timeout) count from now, not from when it was queued."""
        self.queue = None
        self.phase = MigrationPhase.PREPARING
        self.started_at = time.time()
        self.started = time.monotonic()

    def queue_position(self) -> int | None:
        if self.phase is not MigrationPhase.QUEUED or self.queue is None:
            return None
        return self.queue.position(self.domain_id)

    def elapsed_ms(self) -> float:
        """How long it ran (so far, or in all once it ended)."""
        return ((self.finished or time.monotonic()) - self.started) * 1e3

    def snapshot(self) -> MigrationJob:
        return self._view(self.phase, self.error)

    def _view(self, phase: MigrationPhase, error: str | None) -> MigrationJob:
        s = self.stats
        return MigrationJob(
            domain_id=self.domain_id,
            source=self.source,
            target=self.target,
            live=self.params.live,
            phase=phase,
            params=self.params,
            started_at=self.started_at,
            elapsed_ms=self.elapsed_ms(),
            iteration=s.iteration,
            bytes_sent=s.bytes_sent,
            remaining_bytes=s.remaining_bytes,
            memory_bytes=s.memory_bytes,
            dirty_rate=s.dirty_rate,
            bandwidth=s.bandwidth,
            predicted_ms=s.predicted_ms,
            throttle_pct=s.throttle_pct,
            downtime_ms=self.downtime_ms,
            paused_ms=self.paused_ms,
            error=error,
            queue_position=self.queue_position() if phase is MigrationPhase.QUEUED else None,
            target_claim_seq=self.target_claim_seq,
        )

    def progress_event(
        self,
        host: str,
        seq: int,
        state: PowerState,
        final: tuple[MigrationPhase, str | None] | None = None,
    ) -> DomainMigrationProgress:
        """The job's figures as a progress event carrying the domain's current `seq` (and
        the phase and error it is about to end with, if `final`)."""
        s = self.stats
        phase, error = final or (self.phase, self.error)
        return DomainMigrationProgress(
            domain_id=self.domain_id,
            name=self.name,
            host=host,
            seq=max(seq, 1),
            state=state,
            iteration=s.iteration,
            transferred_bytes=s.bytes_sent,
            remaining_bytes=s.remaining_bytes,
            phase=phase.value,
            target=self.target,
            live=self.params.live,
            dirty_rate=s.dirty_rate,
            bandwidth=s.bandwidth,
            predicted_ms=s.predicted_ms,
            throttle_pct=s.throttle_pct,
            elapsed_ms=self.elapsed_ms(),
            downtime_ms=self.downtime_ms,
            error=error,
            queue_position=self.queue_position() if phase is MigrationPhase.QUEUED else None,
            target_claim_seq=self.target_claim_seq,
        )


class Jobs:
    """Each domain's current or last job on this node; the last ended ones kept in `store`
    as well (a job that ran when the node stopped is not: it is no job after a restart)."""

    def __init__(self, store: Store) -> None:
        self._jobs: OrderedDict[uuid.UUID, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._store = store
        # The kept job a new one of the domain displaced from the store, until it starts.
        self._displaced: dict[uuid.UUID, MigrationJob] = {}

    def get(self, domain_id: uuid.UUID) -> Job | None:
        with self._lock:
            return self._jobs.get(domain_id)

    def last(self, domain_id: uuid.UUID) -> MigrationJob | None:
        """The domain's current or last job as reported, from memory or, for one that ended
        before this node restarted, from the store."""
        job = self.get(domain_id)
        return job.snapshot() if job is not None else self._store.kept_job(domain_id)

    def keep(self, view: MigrationJob) -> None:
        """A job ended as `view` says (`Job.end`'s `keep`): its domain's last, across
        restarts too."""
        with self._lock:
            self._displaced.pop(view.domain_id, None)
        self._store.keep_job(view, limit=KEPT_JOBS)

    def running(self, domain_id: uuid.UUID) -> Job | None:
        job = self.get(domain_id)
        return None if job is None or job.final else job

    def add(self, job: Job) -> Job | None:
        """Keep `job` as its domain's; return the one it replaces. Room is made by dropping
        the oldest ended jobs only: a running job is its domain's `migrating` task, and is
        kept however many others start meanwhile (an evacuation of a large host)."""
        # A restart mid-job knows no job of the domain (the kept one is back if it never
        # starts: `restore`).
        kept = self._store.kept_job(job.domain_id)
        self._store.drop_job(job.domain_id)
        with self._lock:
            if kept is not None:
                self._displaced[job.domain_id] = kept
            previous = self._jobs.pop(job.domain_id, None)
            self._jobs[job.domain_id] = job
            excess = len(self._jobs) - KEPT_JOBS
            if excess > 0:
                ended = [d for d, j in self._jobs.items() if j.final][:excess]
                for domain_id in ended:
                    del self._jobs[domain_id]
            return previous

    def restore(self, job: Job, previous: Job | None) -> None:
        """Undo `add(job)`: a job that never started is no job."""
        with self._lock:
            if self._jobs.get(job.domain_id) is not job:
                return
            del self._jobs[job.domain_id]
            if previous is not None:
                self._jobs[job.domain_id] = previous
            kept = self._displaced.pop(job.domain_id, None)
        if previous is not None and previous.final:
            self.keep(previous.snapshot())
        elif kept is not None:
            self._store.keep_job(kept, limit=KEPT_JOBS)
