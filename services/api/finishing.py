"""Finishing a create that was cut off between its define and its start.

The scheduler defines a domain on a host, then starts it. If the scheduler replica stops in
between (killed, or its redelivered request finds nobody to take it over) while the create's
API replica is gone too, or has answered 504 (`schedule_timeout`), the orphan sweep
(services.api.orphans) settles the record from the event log: on the host that defined it,
shut off. The host keeps what the create asked for
with the definition (DefineDomain.start), so the sweep then asks it to start the domain if,
and only if, that start is still pending (StartDomain.if_pending): the user asked for a
running guest and gets one, or the record says why not (task `error`, fault `start_failed`,
which a later `domain.started` from the host ends).
"""

from __future__ import annotations

import structlog

from protos.commands import StartDomain
from protos.domain import Fault, PowerState, TaskState
from protos.replies import DomainInfo
from services.api.context import ApiContext
from services.api.problems import Problem
from services.api.registry.domains import DomainRecord

log = structlog.get_logger("flotilla.api.finishing")


def finish_start(ctx: ApiContext, record: DomainRecord) -> None:
    """Start a settled orphan on its host if its create asked for that and it has not run.
    A refusal, or no answer, puts the record in `error` with fault `start_failed` and the
    host's answer (unless a DELETE came meanwhile); it is never left silently shut off."""
    host = record.host
    if host is None or record.task is not TaskState.NONE or record.power is not PowerState.SHUTOFF:
        return
    try:
        info = ctx.call_host(host, StartDomain(domain_id=record.id, if_pending=True))
    except Problem as problem:
        fault = Fault(
            code="start_failed",
            message=f"its create asked to start it; host {host} answered the start with "
            f"{problem.code}: {problem.detail}",
            host=host,
        )
        ctx.registry.domains.set_task(record.id, TaskState.ERROR, fault, unless=TaskState.DELETING)
        log.warning(
            "interrupted create not started",
            domain_id=str(record.id),
            host=host,
            error=str(problem),
        )
        return
    if isinstance(info, DomainInfo):
        ctx.registry.domains.observe_info(info)
        if info.state is not PowerState.SHUTOFF:
            log.info("interrupted create started", domain_id=str(record.id), host=host)
