"""/v1/hosts (admin): the host view from heartbeats; enable and disable."""

from __future__ import annotations

import time

from fastapi import APIRouter

from protos.routing import compute_queue
from protos.scheduler import SetHostEnabled
from services.api.models import HostEnable, HostList, HostView
from services.api.problems import not_found, responses
from services.api.registry.hosts import HostRecord
from services.api.routes.deps import Admin, Ctx

router = APIRouter(prefix="/v1/hosts", tags=["hosts"])


def _view(record: HostRecord, down_after: float, now: float) -> HostView:
    age = max(0.0, now - record.last_seen)
    inv = record.inventory
    return HostView(
        name=record.name,
        state="up" if age <= down_after * record.interval_s else "down",
        enabled=record.enabled,
        kvm=inv.kvm,
        version=record.version,
        capacity=inv.capacity,
        usage=record.usage,
        cpu_allocation_ratio=inv.cpu_allocation_ratio,
        ram_allocation_ratio=inv.ram_allocation_ratio,
        max_vcpus_per_domain=inv.max_vcpus_per_domain,
        domains_by_state=record.domains_by_state,
        last_seen=record.last_seen,
        seconds_since_heartbeat=round(age, 3),
        vtep=None if inv.vtep is None else str(inv.vtep),
        network_warnings=inv.network_warnings,
        pools=inv.pools,
    )


@router.get("", response_model=HostList, responses=responses(401, 403))
def list_hosts(ctx: Ctx, _admin: Admin) -> HostList:
    """Every host that ever sent a heartbeat; `down` after `host_down_after_intervals` of
    its heartbeat interval without one."""
    now = time.time()
    down_after = ctx.config.host_down_after_intervals
    return HostList(hosts=[_view(h, down_after, now) for h in ctx.registry.hosts.records()])


@router.get("/{host}", response_model=HostView, responses=responses(401, 403, 404))
def get_host(host: str, ctx: Ctx, _admin: Admin) -> HostView:
    found = ctx.registry.hosts.records(host)
    if not found:
        raise not_found(f"host {host}")
    return _view(found[0], ctx.config.host_down_after_intervals, time.time())


def _set_enabled(host: str, enabled: bool, body: HostEnable | None, ctx: Ctx) -> HostView:
    if not ctx.registry.hosts.records(host):
        raise not_found(f"host {host}")
    try:
        queue = compute_queue(host)
    except ValueError:
        raise not_found(f"host {host}") from None
    generation = ctx.registry.hosts.next_generation(host)
    reason = body.reason if body else ""
    ctx.call(queue, SetHostEnabled(enabled=enabled, reason=reason, generation=generation))
    # The host's heartbeats say the same from now on; one it sent before taking the switch
    # (an older generation) does not undo it here.
    ctx.registry.hosts.set_enabled(host, enabled, generation)
    found = ctx.registry.hosts.records(host)
    return _view(found[0], ctx.config.host_down_after_intervals, time.time())


@router.post(
    "/{host}/enable", response_model=HostView, responses=responses(401, 403, 404, 503, 504)
)
def enable_host(host: str, ctx: Ctx, _admin: Admin, body: HostEnable | None = None) -> HostView:
    return _set_enabled(host, True, body, ctx)


@router.post(
    "/{host}/disable", response_model=HostView, responses=responses(401, 403, 404, 503, 504)
)
def disable_host(host: str, ctx: Ctx, _admin: Admin, body: HostEnable | None = None) -> HostView:
    """The host keeps its guests and gets no new ones."""
    return _set_enabled(host, False, body, ctx)
