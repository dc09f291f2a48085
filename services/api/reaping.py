"""Removing a deleted domain from the host it is on, after its DELETE answered.

A DELETE of a domain not placed yet leaves a tombstone (task `deleting`, no host,
services.api.registry.domains's `tombstone`): the create's scheduler may still define and
start it somewhere, and its create's API replica may be gone. Wherever it then appears (its
`domain.defined` or `domain.started`, projected by any replica), it is destroyed and undefined
there; the record goes with that host's `domain.undefined`, and its ports and volumes are
released. The orphan sweep (services.api.orphans) settles the tombstones of domains that never
reached a host, and tries again where a host did not answer.

A domain whose record is gone altogether (its delete done) that a host reports defined or
started afterwards is taken off that host too: the reap is remembered with the event's
projection (`pending_reaps`) until it is done, so neither a replica killed before it ran it
nor a host that did not answer leaves the guest running unknown.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import structlog

from protos import routing
from protos.commands import DestroyDomain, UndefineDomain
from protos.domain import TaskState
from protos.network import ReleasePorts
from services.api.context import ApiContext
from services.api.problems import Problem
from services.api.registry.domains import DomainRecord
from services.api.routes import disks

log = structlog.get_logger("flotilla.api.reaping")


def destroy_and_undefine(ctx: ApiContext, host: str, domain_id: uuid.UUID, active: bool) -> None:
    """Destroy (if `active`) and undefine the domain on `host`. The registry's view may lag
    the host's: a `conflict` from either step means the host saw the other state, so the
    other order is tried once. Raises Problem (`not_found`: the host has no such domain)."""
    if active:
        try:
            ctx.call_host(host, DestroyDomain(domain_id=domain_id))
        except Problem as problem:
            if problem.code != "conflict":
                raise
    try:
        ctx.call_host(host, UndefineDomain(domain_id=domain_id))
    except Problem as problem:
        if problem.code != "conflict":
            raise
        ctx.call_host(host, DestroyDomain(domain_id=domain_id))
        ctx.call_host(host, UndefineDomain(domain_id=domain_id))


def release_ports(ctx: ApiContext, record: DomainRecord) -> None:
    """The domain is off its host: its NICs' ports (and addresses) go back to the network
    service. Idempotent there; a failure is logged (DELETE again releases again)."""
    if not record.spec.nics:
        return
    try:
        ctx.call(routing.NETWORK_QUEUE, ReleasePorts(domain_id=record.id))
    except Problem as problem:
        log.warning("ports not released", domain_id=str(record.id), error=problem.detail)


def release(ctx: ApiContext, record: DomainRecord) -> None:
    """What a domain gone from every host held: its ports and volumes."""
    release_ports(ctx, record)
    disks.release_disks(ctx, record.id, record.spec)


def reap(ctx: ApiContext, domain_id: uuid.UUID, host: str) -> None:
    """Destroy and undefine a domain being deleted on `host`, where it appeared after its
    DELETE (or where a DELETE's own calls were cut short). Once that is its host and the host
    has it no more, its ports and volumes are released; a host that never had it removes the
    record then. A failure is logged: the orphan sweep tries again."""
    record = ctx.registry.domains.get(domain_id)
    if record is None:
        if ctx.registry.domains.was_removed(domain_id):
            _reap_removed(ctx, domain_id, host)
        else:
            ctx.registry.domains.reaped(domain_id, host)  # forgotten: nothing to do
        return
    if record.task is not TaskState.DELETING:
        return  # not deleted at all
    taken = _take_off(ctx, domain_id, host)
    if taken is None:
        return
    if not taken:
        ctx.registry.domains.remove_deleted(domain_id, host)  # already gone from the host
    log.info("deleted domain removed from the host it appeared on", domain_id=str(domain_id))
    if record.host == host:
        release(ctx, record)


def _reap_removed(ctx: ApiContext, domain_id: uuid.UUID, host: str) -> None:
    """A domain whose record was removed (its delete done, or its tombstone settled) came up
    on `host` afterwards, e.g. a create's retry there after the first host's clean-up: no
    record, no ports or volumes held for it any more, so it only goes from the host. Done
    (or the host has no such domain), its pending reap goes; a host that failed keeps it,
    for the orphan sweep to try again."""
    if _take_off(ctx, domain_id, host) is not None:
        ctx.registry.domains.reaped(domain_id, host)
        log.info("removed domain taken off the host it appeared on", domain_id=str(domain_id))


def _take_off(ctx: ApiContext, domain_id: uuid.UUID, host: str) -> bool | None:
    """Destroy and undefine a deleted domain on `host`: True when done, False when the host
    has no such domain, None when the host failed (logged: the orphan sweep tries again)."""
    try:
        destroy_and_undefine(ctx, host, domain_id, active=True)
    except Problem as problem:
        if problem.code != "not_found":
            log.warning("deleted domain left on its host", domain_id=str(domain_id), host=host)
            return None
        return False
    return True


class Reaper:
    """Runs `reap` off the caller's thread (the event projection goes on meanwhile)."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="api-reap")

    def submit(self, domain_id: uuid.UUID, host: str) -> None:
        self._pool.submit(self._run, domain_id, host)

    def _run(self, domain_id: uuid.UUID, host: str) -> None:
        try:
            reap(self.ctx, domain_id, host)
        except Exception:
            log.exception("reap failed", domain_id=str(domain_id), host=host)

    def stop(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
