"""Migration of a domain between compute nodes (docs/migration.md, "The control plane").

The flow, each arrow an RPC on the bus:

    API --MigrateDomain--> scheduler: picks the target through its filters (never the source;
        the caller may name it), claims room there, then
    scheduler --StartMigration--> source compute node: checks the state table; over the
        source's limit of concurrent migrations it answers the job `queued` at once and goes
        on from here only when a slot frees (compute_node.migration_queue), then
    source --PrepareIncoming--> target compute node: defines the domain there, `incoming`
        (not listed, no events yet), claims its resources, plugs its ports, and (live) starts a
        VMM waiting on a TCP port with a one-time token; answers with where to stream
    source: answers StartMigration with the job (the stream runs in the background), streams
        the machine; on the commit its VMM ends (STOPPED/MIGRATED after SUSPENDED/MIGRATED on
        the source), then
    source --FinishIncoming(committed, seq)--> target: the target's record takes the seq the
        source reached and its own events follow it (STARTED/MIGRATED, then SUSPENDED/MIGRATED
        if the guest was paused); the source drops its record; the ports are bound to the
        target (network service BindPorts: VXLAN forwarding entries move).
    Anything failing before the commit resumes the source (SUSPENDED/MIGRATED then
    RESUMED/MIGRATED if it had been paused for the last pages) and the source sends
    FinishIncoming(committed=False): the target ends its VMM, unplugs, releases its claim and
    forgets the domain. Exactly one running copy, always.

A cold migration (`live` false; the domain shut off) is the same without a VMM: the
definition moves, the target's first event is DEFINED/MIGRATED with the seq continuing, and the
source's record goes without an UNDEFINED (its host-local volumes move first, through the
storage service).

Progress: `domain.migration_progress` events (protos.events) at most every
`MIGRATION_PROGRESS_S` and one final one (`phase` done, failed or cancelled, with the measured
pause). They carry the seq of the domain's last lifecycle event (they are no lifecycle event:
the registry logs them and projects nothing from them except ending the `migrating` task on
the final one).
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from ipaddress import IPv4Address

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
from protos.bindings import DiskBinding, ImageRef, PortBinding
from protos.commands import Command, DomainCommand
from protos.domain import MAX_DISKS, NAME_PATTERN, DomainSpec, PowerState
from protos.replies import Done

MIGRATION_PROGRESS_S = 1.0
MAX_DOWNTIME_MS = 60_000.0


class TimeoutAction(StrEnum):
    """What `timeout_s` does to a live migration still copying (virsh migrate --timeout
    --timeout-suspend/--timeout-postcopy): `abort` cancels it (the source runs on), `pause`
    pauses the guest so the rest copies without new dirt (it completes, then runs on the
    target paused as libvirt's --timeout-suspend leaves it)."""

    ABORT = "abort"
    PAUSE = "pause"


class MigrationParams(BaseModel):
    """How to migrate (virsh migrate's options). `max_downtime_ms`: the pause the pre-copy
    converges to (migrate-setmaxdowntime); `bandwidth_mibps`: a cap on the stream (0: none;
    migrate-setspeed); `auto_converge`: throttle the vCPUs when the dirty rate outruns the
    stream; `verify`: memory checksums verified on arrival (a debug mode the tests use)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    live: bool = True
    max_downtime_ms: float = Field(default=300.0, gt=0, le=MAX_DOWNTIME_MS)
    bandwidth_mibps: int = Field(default=0, ge=0, le=1 << 20)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    timeout_action: TimeoutAction = TimeoutAction.ABORT
    auto_converge: bool = True
    verify: bool = False


class MigrationPhase(StrEnum):
    QUEUED = "queued"  # waits on its source for a slot (max_concurrent_migrations)
    PREPARING = "preparing"  # the target is being prepared
    SETUP = "setup"  # the stream is open, the config sent
    PRECOPY = "precopy"  # memory streams while the guest runs
    STOPCOPY = "stopcopy"  # the source is paused: the last pages and the device state
    COMMIT = "commit"  # the target loaded everything and is told to run
    DONE = "done"  # the target runs the guest; the source's machine is gone
    FAILED = "failed"  # ended before the commit: the source runs on
    CANCELLED = "cancelled"  # domjobabort before the commit: the source runs on


FINAL_PHASES = frozenset({MigrationPhase.DONE, MigrationPhase.FAILED, MigrationPhase.CANCELLED})


class MigrationJob(Message):
    """A domain's migration job as its source sees it (virsh domjobinfo). Figures are of
    the memory stream; `downtime_ms` is the pause the target measured (set once DONE),
    `paused_ms` the source's own measure of it. `error` says why a FAILED job failed.
    `queue_position` is the job's place in its source's queue while QUEUED (1: next).
    `target_claim_seq` (1.2): the target's claim count at which it took the domain's
    resources (IncomingEndpoint.claim_seq; None until it did, and for a cold migration)."""

    TYPE = "reply.migration_job"
    VERSION = "1.2"  # 1.1: phase `queued`, `queue_position`; 1.2: `target_claim_seq`
    domain_id: uuid.UUID
    source: str
    target: str
    live: bool
    phase: MigrationPhase
    params: MigrationParams
    started_at: float  # epoch seconds
    elapsed_ms: float = Field(ge=0)
    iteration: int = Field(default=0, ge=0)
    bytes_sent: int = Field(default=0, ge=0)
    remaining_bytes: int = Field(default=0, ge=0)
    memory_bytes: int = Field(default=0, ge=0)
    dirty_rate: int = Field(default=0, ge=0)  # bytes/s
    bandwidth: int = Field(default=0, ge=0)  # bytes/s measured
    predicted_ms: float = Field(default=0.0, ge=0)
    throttle_pct: int = Field(default=0, ge=0, le=100)
    downtime_ms: float | None = None
    paused_ms: float | None = None
    error: str | None = None
    queue_position: int | None = Field(default=None, ge=1)
    target_claim_seq: int | None = Field(default=None, ge=0)


# ---- API → scheduler ---------------------------------------------------------------------


class MigrateDomain(Command):
    """Migrate `domain_id` off `source` (the registry's host): to `target` if named (still
    checked by the filters: enabled, up, room, the domain's host-local volumes), else to the
    best host the filters and weighers leave (never the source). Answers once the source
    has the job under way (the migration itself ends in events); `no_valid_host` with the
    filters' reasons when no host qualifies; `conflict` from the source's state table."""

    TYPE = "cmd.scheduler.migrate"
    VERSION = "1.3"  # 1.1: `spec`; 1.2: `spec.boot.initrd_image`; 1.3: `pools`
    RESULT = MigrationJob
    domain_id: uuid.UUID
    source: str = Field(pattern=NAME_PATTERN)
    target: str | None = Field(default=None, pattern=NAME_PATTERN)
    project: str = Field(pattern=NAME_PATTERN)
    params: MigrationParams = MigrationParams()
    # The registry's spec: the domain's server group and policy for the group filter (its
    # size is read from the source, which runs it).
    spec: DomainSpec | None = None
    # The host-local (`dir`) pools of the domain's volumes (the storage catalog's): their
    # volumes move to the target's pool of the same name, so the target must have each.
    pools: list[str] = Field(default=[], max_length=MAX_DISKS)


# ---- scheduler → source compute node ------------------------------------------------------


class StartMigration(DomainCommand):
    """Sent to `compute.<source>`: migrate the domain to `target` (prepared by the source's
    PrepareIncoming). Refused (`conflict`) by the state table (MIGRATE) or while a job runs;
    `unsupported` for a live migration the driver cannot do; `invalid` for a live migration
    of a domain with a host-local disk (cold-migrate it). Answers with the job under way."""

    TYPE = "cmd.domain.migrate"
    RESULT = MigrationJob
    target: str = Field(pattern=NAME_PATTERN)
    params: MigrationParams = MigrationParams()


class GetMigrationJob(DomainCommand):
    """The domain's current job, or its last one (kept on the source until the domain is
    gone from it); `not_found` if it never migrated from here."""

    TYPE = "cmd.domain.migration_job"
    RESULT = MigrationJob
    READ_ONLY = True


class AbortMigration(DomainCommand):
    """virsh domjobabort: cancel the job before its commit (the source runs on: phase
    CANCELLED). After the commit it is too late (`conflict`, reason `committed`)."""

    TYPE = "cmd.domain.migration_abort"
    RESULT = MigrationJob


class SetMigrationParams(DomainCommand):
    """Change a running job's budget or cap (migrate-setmaxdowntime, migrate-setspeed); the
    pre-copy uses them from its next round."""

    TYPE = "cmd.domain.migration_set"
    RESULT = MigrationJob
    max_downtime_ms: float | None = Field(default=None, gt=0, le=MAX_DOWNTIME_MS)
    bandwidth_mibps: int | None = Field(default=None, ge=0, le=1 << 20)


# ---- source compute node → target compute node --------------------------------------------


class IncomingEndpoint(Message):
    """Where the source streams the machine: a one-time `token` (32 random bytes, hex) for
    this domain on `address:port` of the target's migration listener (None for a cold
    migration: nothing streams)."""

    TYPE = "reply.incoming_endpoint"
    VERSION = "1.1"  # 1.1: claim_seq, stream_version
    domain_id: uuid.UUID
    host: str
    address: IPv4Address | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    token: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    vtep: IPv4Address | None = None  # the target's VXLAN underlay address, for BindPorts
    # The target's claim count at which it took the domain's resources (a live migration;
    # 1.1): every heartbeat of the target with `claims_seq` at or past it counts them.
    claim_seq: int | None = Field(default=None, ge=0)
    # The newest migration stream version the target's VMM speaks (1.1; native/migrate.h):
    # the source speaks it. None (a target of an older release): version 1.
    stream_version: int | None = Field(default=None, ge=1)


class PrepareIncoming(Command):
    """Sent to `compute.<target>` by the source: take in domain `spec` (with what the source
    holds for it: the definition's privileged flag, disks, boot images and ports). The record
    is `incoming` until FinishIncoming: not listed, no events. A live migration claims the
    resources and starts the VMM waiting on the listener (`paused`: the guest was paused
    and stays so). Refused: `conflict` when the domain is defined here already, `no_capacity`,
    the boot and storage checks of DefineDomain."""

    TYPE = "cmd.domain.prepare_incoming"
    VERSION = "1.1"  # 1.1: `spec.boot.initrd_image`
    RESULT = IncomingEndpoint
    spec: DomainSpec
    source: str = Field(pattern=NAME_PATTERN)
    live: bool = True
    paused: bool = False
    privileged: bool = False
    disks: list[DiskBinding] = Field(default=[], max_length=MAX_DISKS)
    kernel_image: ImageRef | None = None
    initrd_image: ImageRef | None = None
    ports: list[PortBinding] = Field(default=[], max_length=8)
    seq: int = Field(ge=0)  # the source's seq when it asked (FinishIncoming gives the last)


class FinishIncoming(Command):
    """Sent to `compute.<target>` by the source when its job ends. `committed`: the target's
    machine runs the guest; its record becomes the domain's with `seq` (the last seq the
    source emitted) and its events follow. Not committed: end the waiting VMM, unplug,
    release the claim and forget the domain (a no-op if it was never prepared)."""

    TYPE = "cmd.domain.finish_incoming"
    RESULT = Done
    domain_id: uuid.UUID
    committed: bool
    seq: int = Field(ge=0)
    state: PowerState | None = None  # as the source last saw it (running or paused)


SCHEDULER_MIGRATION_COMMANDS: tuple[type[Command], ...] = (MigrateDomain,)
COMPUTE_MIGRATION_COMMANDS: tuple[type[Command], ...] = (
    StartMigration,
    GetMigrationJob,
    AbortMigration,
    SetMigrationParams,
    PrepareIncoming,
    FinishIncoming,
)
