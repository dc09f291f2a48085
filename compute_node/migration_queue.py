"""How many migrations leave this host at once (the compute node's `max_concurrent_migrations`,
as Nova's `max_concurrent_live_migrations`): a job over the limit waits in `MigrationQueue`,
first come first served, and runs when a running one ends.

Live and cold migrations count alike: both copy through this host's link and disks (a live
one streams its memory and its host-local volumes, a cold one has its host-local volumes moved
first); a cold one without such volumes holds its slot for the few calls its commit takes.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from typing import Generic, TypeVar

J = TypeVar("J")


class MigrationQueue(Generic[J]):
    """Slots for running jobs (at most `limit` at once; 0: no limit) and the jobs waiting for
    one, in arrival order. Thread-safe; each domain holds a slot or a place, never both."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("the limit is 0 (none) or more")
        self.limit = limit
        self._lock = threading.Lock()
        self._running: set[uuid.UUID] = set()
        self._waiting: OrderedDict[uuid.UUID, J] = OrderedDict()

    def admit(self, domain_id: uuid.UUID, job: J) -> bool:
        """True: a slot is the domain's now (run the job); False: the job waits for one."""
        with self._lock:
            if domain_id in self._running or domain_id in self._waiting:
                raise ValueError(f"domain {domain_id} has a migration here already")
            if not self._waiting and (self.limit == 0 or len(self._running) < self.limit):
                self._running.add(domain_id)
                return True
            self._waiting[domain_id] = job
            return False

    def position(self, domain_id: uuid.UUID) -> int | None:
        """The job's place in the queue (1: the next to run), None if it waits for none."""
        with self._lock:
            for i, waiting in enumerate(self._waiting, start=1):
                if waiting == domain_id:
                    return i
            return None

    def withdraw(self, domain_id: uuid.UUID) -> J | None:
        """Take the domain's job out of the queue (cancelled before it ran): the job, or None
        when it does not wait (it runs already, or ended)."""
        with self._lock:
            return self._waiting.pop(domain_id, None)

    def release(self, domain_id: uuid.UUID) -> list[tuple[uuid.UUID, J]]:
        """The domain's job ended (or never ran): its slot, if it held one, goes to the next
        waiting jobs, returned in order: each holds a slot now and is to be started."""
        with self._lock:
            self._running.discard(domain_id)
            started: list[tuple[uuid.UUID, J]] = []
            while self._waiting and (self.limit == 0 or len(self._running) < self.limit):
                next_id, job = self._waiting.popitem(last=False)
                self._running.add(next_id)
                started.append((next_id, job))
            return started

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def waiting(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._waiting)
