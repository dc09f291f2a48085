"""Settles creates whose API replica died mid-request (services.api.registry.settling).

A create stores its record (task `scheduling`), waits for the scheduler, then records the
placement. If the replica handling it is killed in between, the domain's start on a host
places it (services.api.registry.events.apply); one that never starts (`start: false`,
nothing placed) no other replica would ever touch; nor would any touch a create answered 504
(the scheduler did not answer in time: `error`, fault `schedule_timeout`) whose start never
came. Every replica runs this sweep: a record still in `scheduling`, or in `error` with
`schedule_timeout`, well after the longest a live create waits is settled from the event log,
and one left defined but not started although its create asked to start it is started there
(services.api.finishing).

It settles deletes too (services.api.reaping): a tombstone (a domain deleted before it was
placed) whose create is over is removed, or put on the host its events name and removed
from there; a domain left `deleting` on a host (its DELETE's calls cut short) is destroyed
and undefined there again, every `older_than_s`, until its host's `domain.undefined` ends it.
A removed domain's reap still pending `REAP_RETRY_S` after it was asked (its replica died, its
host did not answer) is run again, every `REAP_RETRY_S`, until the host no longer has it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import structlog

from services.api.registry import Registry
from services.api.registry.domains import DomainRecord
from services.db import DatabaseUnavailable

log = structlog.get_logger("flotilla.api.orphans")

SWEEP_INTERVAL_S = 5.0
# Beyond the scheduler's timeout, what a live create may still spend (an RPC resent after a
# lost broker connection, storing the placement) before its record counts as orphaned.
GRACE_S = 10.0
# How long a removed domain's reap may be pending before a sweep runs it again: the replica
# that projected its event runs it at once, and its calls to the host last seconds.
REAP_RETRY_S = 15.0


class OrphanSweeper:
    """A daemon thread settling orphaned creates every `interval_s`."""

    def __init__(
        self,
        registry: Registry,
        schedule_timeout_s: float,
        interval_s: float = SWEEP_INTERVAL_S,
        *,
        reap: Callable[[uuid.UUID, str], None] | None = None,
        release: Callable[[DomainRecord], None] | None = None,
        finish: Callable[[DomainRecord], None] | None = None,
        reap_retry_s: float = REAP_RETRY_S,
    ) -> None:
        self.registry = registry
        self.reap = reap
        self.release = release
        # Starts a settled create whose start never came, if it asked for one
        # (services.api.finishing).
        self.finish = finish
        self.older_than_s = schedule_timeout_s + GRACE_S
        self.reap_retry_s = reap_retry_s
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-orphans", daemon=True)

    def start(self) -> OrphanSweeper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def sweep(self) -> None:
        for record in self.registry.settling.resolve_orphans(self.older_than_s):
            log.warning(
                "create settled after its API replica stopped",
                domain_id=str(record.id),
                host=record.host,
                task=record.task.value,
                fault=record.fault.code if record.fault else None,
            )
            if self.finish is not None and record.host is not None:
                self.finish(record)
        self.settle_deletes()

    def settle_deletes(self) -> None:
        """Tombstones whose domain never reached a host go (their ports and volumes are
        released); a deleted domain still on a host is destroyed and undefined there again."""
        to_reap, removed = self.registry.settling.settle_deletes(self.older_than_s)
        for record, host in to_reap:
            log.warning(
                "delete not done yet: asking its host again", domain_id=str(record.id), host=host
            )
            if self.reap is not None:
                self.reap(record.id, host)
        for record in removed:
            log.info("deleted domain that never reached a host removed", domain_id=str(record.id))
            if self.release is not None:
                self.release(record)
        for domain_id, host in self.registry.domains.due_reaps(self.reap_retry_s):
            log.warning(
                "removed domain still on a host: asking it again",
                domain_id=str(domain_id),
                host=host,
            )
            if self.reap is not None:
                self.reap(domain_id, host)
        self.registry.domains.forget_removed()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.sweep()
            except DatabaseUnavailable as exc:  # the next sweep will do
                log.warning("orphan sweep skipped", error=str(exc))
            except Exception:
                log.exception("orphan sweep failed")
