"""Which command caused a guest event.

A command acts on a guest (start, destroy, shutdown, …) and the driver reports what happened
later, from another thread: the events must still carry the command's correlation id and, as
their causation, its message id. Each command that acts registers what it expects to happen
(`expect`), in order; the driver event that matches a step takes the command's cause
(`take`). Events nobody asked for — the guest powering itself off, a crash — match nothing and
carry no cause. A newer command on the same domain replaces an older one's expectations;
expectations left unmet (a shutdown the guest ignored) lapse after their time.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from compute_node.driver import GuestEventKind
from services.bus import Cause

K = GuestEventKind


@dataclass
class _Pending:
    cause: Cause
    steps: list[frozenset[GuestEventKind]]
    expires: float


class PendingCauses:
    """Thread-safe: commands register from worker threads, driver events arrive on others."""

    def __init__(self) -> None:
        self._pending: dict[uuid.UUID, _Pending] = {}
        self._lock = threading.Lock()

    def expect(
        self,
        domain_id: uuid.UUID,
        cause: Cause | None,
        *steps: set[GuestEventKind],
        within_s: float = 120.0,
    ) -> None:
        """The next driver events of `domain_id` matching `steps` (each a set of kinds, any of
        which completes the step; a later step may be met first) were caused by `cause`."""
        with self._lock:
            if cause is None or not steps:
                self._pending.pop(domain_id, None)
                return
            self._pending[domain_id] = _Pending(
                cause, [frozenset(s) for s in steps], time.monotonic() + within_s
            )

    @contextlib.contextmanager
    def expecting(
        self,
        domain_id: uuid.UUID,
        cause: Cause | None,
        *steps: set[GuestEventKind],
        within_s: float = 120.0,
    ) -> Iterator[None]:
        """`expect` for the block that asks the driver for it: a block that raises made
        nothing happen, so its expectation goes (no later event takes a failed command's
        cause)."""
        self.expect(domain_id, cause, *steps, within_s=within_s)
        try:
            yield
        except BaseException:
            self.forget(domain_id)
            raise

    def take(self, domain_id: uuid.UUID, kind: GuestEventKind) -> Cause | None:
        """The cause of a driver event of `kind`, if a command expected it; consumes the step
        (and any before it)."""
        with self._lock:
            pending = self._pending.get(domain_id)
            if pending is None:
                return None
            if time.monotonic() > pending.expires:
                del self._pending[domain_id]
                return None
            for i, step in enumerate(pending.steps):
                if kind in step:
                    del pending.steps[: i + 1]
                    if not pending.steps:
                        del self._pending[domain_id]
                    return pending.cause
            return None

    def forget(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            self._pending.pop(domain_id, None)
