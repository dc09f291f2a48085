"""Following one VMM's journal: a thread per machine subscribed to its VMM's control socket,
handing each record on in order. A VMM that dies without a final `stopped` record is noticed at
once (the subscription hits EOF) and journaled here as `stopped`/`failed`, so the numbering
stays continuous for the next machine."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Protocol

from compute_node.vmm import client as vmm_client
from compute_node.vmm.frames import JOURNAL, Journal, JournalRecord

RECORD_TIMEOUT_S = 10.0
CGROUP_PARENT = Path("/sys/fs/cgroup/flotilla")


class WatchOwner(Protocol):
    """What a watch needs of the driver that made it."""

    def deliver(self, domain_id: uuid.UUID, record: JournalRecord) -> None: ...

    def ended_cleanly(self, directory: Path) -> bool: ...

    def forget_watch(self, domain_id: uuid.UUID, watch: Watch) -> None: ...


class Watch:
    """Follows one VMM's journal on a thread of its own."""

    def __init__(
        self,
        driver: WatchOwner,
        domain_id: uuid.UUID,
        directory: Path,
        pid: int | None,
        *,
        incoming: bool = False,
    ) -> None:
        self.driver = driver
        self.domain_id = domain_id
        self.directory = directory
        self.pid = pid
        # A VMM waiting for an incoming migration ends silently until its guest started.
        self.incoming = incoming
        self.delivered = 0
        self.started_n = 0
        self.finished = False
        self.closing = False
        self.cond = threading.Condition()
        self._sub: vmm_client.VmmSubscription | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{domain_id}", daemon=True)

    def start(self, after_n: int) -> int | None:
        """Follow from record `after_n` on; the last record journaled as it began (None from
        an older VMM that does not say)."""
        self.delivered = self.started_n = after_n
        self._sub = vmm_client.VmmClient(self.directory).subscribe(after_n)
        self._thread.start()
        return self._sub.journal_n

    def _run(self) -> None:
        while True:
            assert self._sub is not None
            try:
                while True:
                    record = self._sub.next_record(None)
                    if record is not None:
                        self._deliver(record)
            except vmm_client.VmmClientError:
                pass  # EOF: the VMM exited or died, or cut off a subscriber that fell behind
            except OSError:
                pass  # closed by stop(): the worker is going away, the VMM stays
            finally:
                self._sub.close()
            if self.closing:
                return
            if not self._resubscribe():
                break
        self.ended()

    def _resubscribe(self) -> bool:
        """After an EOF: if the VMM still answers, follow it again from the last record."""
        try:
            vmm_client.VmmClient(self.directory).status()
            self._sub = vmm_client.VmmClient(self.directory).subscribe(self.delivered)
        except vmm_client.VmmClientError:
            return False
        return True

    def _deliver(self, record: JournalRecord) -> None:
        if record["n"] <= self.delivered:
            return
        self.driver.deliver(self.domain_id, record)
        with self.cond:
            self.delivered = record["n"]
            self.cond.notify_all()

    def ended(self, death: str = "the VMM process died") -> None:
        """The VMM is gone: reap it if it is ours, deliver what it journaled that was not
        delivered, journal its death (`stopped`/failed, reason `death`) if it left no final
        record, then stop watching."""
        if self.pid is not None:
            try:
                vmm_client.wait_exit(self.pid, 2.0)
            except ChildProcessError:
                pass  # adopted: not our child
        # Records written just before the end that the subscription did not carry.
        for record in vmm_client.read_journal(self.directory / JOURNAL, self.delivered):
            self._deliver(record)
        silent = self.incoming and self.delivered == self.started_n
        if not silent and not self.driver.ended_cleanly(self.directory):
            journal = Journal(str(self.directory / JOURNAL))
            try:
                record = journal.append("stopped", "failed", death)
            finally:
                journal.close()
            self._deliver(record)
        try:
            # The VMM cannot leave its own cgroup; an empty one is removed here (best effort).
            (CGROUP_PARENT / str(self.domain_id)).rmdir()
        except OSError:
            pass  # none (no cgroup v2 here), or a process still in it
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        self.driver.forget_watch(self.domain_id, self)

    def wait_for(self, n: int, timeout: float = RECORD_TIMEOUT_S) -> bool:
        """Wait until records up to `n` were delivered (or the machine ended)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.delivered >= n or self.finished, timeout)

    def stop(self) -> None:
        self.closing = True
        if self._sub is not None:
            # shutdown() wakes the thread blocked reading it; close() alone would not.
            try:
                sock = socket.socket(fileno=os.dup(self._sub.fileno()))
            except OSError:
                return  # the thread closed it already (the VMM ended): nothing to wake
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()
