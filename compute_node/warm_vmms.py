"""Warm VMMs: the KVM driver's spare VMM processes, so a start or a restore does not pay for
Python's start and the VMM's imports (docs/compute.md, "Warm VMMs").

`WarmVmms(spares_dir, count)` first ends what a previous node left in `spares_dir`, then keeps
`count` spares (compute_node/vmm/warm.py) on a thread of its own. `launch()` starts a
domain's VMM: on a spare when there is one (one still importing is put back to full priority
and waited for: it is further on than a cold start), else cold (`client.spawn`), and cold too
whenever the spare fails to take it (it died, answered wrongly or not in time; it is ended
and has taken nothing), so no start is lost to a spare. The next spare is made
`refill_delay` seconds after the caller's `reporting()` block (the start and its report)
ended, at a lower priority while it imports. A spare that does not get ready within
`ready_timeout` (the node's VMM spawn timeout) is ended, and the next is tried `RETRY_S` later,
twice as long after each failure in a row up to `RETRY_MAX_S`: on a host too loaded to start
one in time, spares started and ended every few seconds would only load it more. Spares are
no domains: nothing lists or adopts them, and `close()` ends them.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from compute_node.vmm import client
from compute_node.vmm.spare import MAX_FDS
from compute_node.vmm.warm import (
    ASSIGN_TIMEOUT_S,
    READY_TIMEOUT_S,
    Spare,
    SpareUnusable,
    end_leftovers,
)

log = structlog.get_logger("flotilla.compute.warm")

REFILL_DELAY_S = 0.01
# After a spare that could not start or get ready: try again this much later, doubled after
# each failure in a row up to RETRY_MAX_S.
RETRY_S = 5.0
RETRY_MAX_S = 300.0
# How often an idle pool looks for a spare that died meanwhile.
CHECK_S = 2.0
# A spare being made when the node stops: its thread ends it once it is ready or not.
READY_JOIN_S = 15.0


class WarmVmms:
    def __init__(
        self,
        spares_dir: Path,
        count: int,
        *,
        refill_delay: float = REFILL_DELAY_S,
        assign_timeout: float = ASSIGN_TIMEOUT_S,
        ready_timeout: float = READY_TIMEOUT_S,
        retry: float = RETRY_S,
        retry_max: float = RETRY_MAX_S,
        python: str = sys.executable,
    ) -> None:
        self.spares_dir = spares_dir
        self.count = count
        self.refill_delay = refill_delay
        self.assign_timeout = assign_timeout
        self.ready_timeout = ready_timeout
        self.retry = retry
        self.retry_max = retry_max
        self.python = python
        self.failures = 0  # spares in a row that could not start or get ready
        spares_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ended = end_leftovers(spares_dir)
        if ended:
            log.info("ended spare VMMs a previous node left", pids=ended)
        self.warm_starts = 0
        self.cold_starts = 0
        self._spares: list[Spare] = []
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0
        self._thread: threading.Thread | None = None
        if count > 0:
            self._thread = threading.Thread(target=self._run, name="warm-vmms", daemon=True)
            self._thread.start()

    def pids(self) -> list[int]:
        """The ready spares' pids."""
        with self._cond:
            return [s.pid for s in self._spares if s.ready]

    @contextlib.contextmanager
    def reporting(self) -> Iterator[None]:
        """No spare is made while a start (and its report) runs in this block."""
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def launch(self, directory: Path, pass_fds: Sequence[int], timeout: float) -> int:
        """Starts the VMM of `directory` (its vmm.json written) inheriting `pass_fds`, as
        `client.spawn` does and with its result: the pid once it answers, or VmmSpawnError."""
        # More descriptors than one message carries: cold (the spare stays for another).
        spare = self._take() if len(pass_fds) <= MAX_FDS else None
        if spare is not None:
            before = client.journal_tail(directory)
            try:
                pid = spare.assign(directory, pass_fds, self.assign_timeout)
            except SpareUnusable as exc:
                log.warning("spare VMM unusable; starting cold", pid=spare.pid, reason=str(exc))
            else:
                try:
                    pid = client.wait_ready(directory, pid, before, timeout)
                except client.VmmVanished as exc:
                    log.warning("assigned spare VMM ended; starting cold", reason=exc.reason)
                else:
                    with self._cond:
                        self.warm_starts += 1
                    return pid
        with self._cond:
            self.cold_starts += 1
        return client.spawn(directory, pass_fds=pass_fds, timeout=timeout)

    def _take(self) -> Spare | None:
        with self._cond:
            while self._spares:
                spare = self._spares.pop(0)
                if spare.alive():
                    return spare
                log.warning("spare VMM died", pid=spare.pid, status=spare.proc.poll())
                spare.end()
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._wanted, CHECK_S)
                if self._closed:
                    return
                self._drop_dead()
                if not self._wanted():
                    continue
                # Off the start's critical path: a little after the caller reported it.
                if self._cond.wait_for(lambda: self._closed or self._busy > 0, self.refill_delay):
                    continue
            try:
                spare = Spare.start(self.spares_dir, self.python)
            except OSError as exc:
                log.warning("cannot start a spare VMM", error=str(exc))
                self._failed()
                continue
            with self._cond:
                if self._closed:
                    spare.end()
                    return
                # Takeable at once: one still importing beats a cold start.
                self._spares.append(spare)
            try:
                spare.wait_readable(self.ready_timeout)
                spare.wait_ready(self.assign_timeout)
            except SpareUnusable as exc:
                with self._cond:
                    ours = spare in self._spares  # else a launch took it: its business
                    if ours:
                        self._spares.remove(spare)
                if ours:
                    log.warning("spare VMM did not get ready", pid=spare.pid, reason=str(exc))
                    spare.end()
                    self._failed()
            else:
                self.failures = 0

    def _wanted(self) -> bool:
        return self._closed or (self._busy == 0 and len(self._spares) < self.count)

    def _drop_dead(self) -> None:
        for spare in [s for s in self._spares if not s.alive()]:
            log.warning("spare VMM died", pid=spare.pid, status=spare.proc.poll())
            self._spares.remove(spare)
            spare.end()

    def _failed(self) -> None:
        self.failures += 1
        self._pause(min(self.retry * 2 ** (self.failures - 1), self.retry_max))

    def _pause(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed, seconds)

    def close(self) -> None:
        """Ends every spare (a clean stop of the node); a spare being made is ended too."""
        with self._cond:
            self._closed = True
            spares, self._spares = self._spares, []
            self._cond.notify_all()
        for spare in spares:
            spare.end()
        if self._thread is not None:
            self._thread.join(READY_JOIN_S)
