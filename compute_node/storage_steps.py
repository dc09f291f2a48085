"""Storage catalog steps that must not be lost: a live migration's `commit` of the volumes
its stream copied, or its `abort` (compute_node.volume_copies).

Once the target runs the guest on its copy, the catalog must come to name the target, however
long the storage service is away. The step is written to the node's store (`compute.db`,
table `storage_steps`) before the job reports `done`, with the message id it is sent under;
`PendingSteps` sends it at once and then, from a thread of its own, again and again (the
same message id each time: the storage service runs a message id once and answers a repeat
from its record, and the step itself answers a repeat as it is) until the catalog answers.
`unavailable` and `busy` are about the moment and tried again, under a new message id (the
refusal is recorded under the old one); any other refusal is final:
logged, and the step is dropped. Steps left in the store when the node stopped are sent when
it starts again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Protocol

import structlog

from protos import routing
from protos.base import Message
from protos.commands import Command
from protos.volumes import LiveMoveVolume
from services.bus.errors import BusError, RemoteError

log = structlog.get_logger("flotilla.compute.storage_steps")

# A sender: the node's bus call (queue, command, timeout, message_id), or None before the
# node has one.
Send = Callable[[str, Command, float, str | None], Message]

FIRST_TRY_S = 5.0  # the job's own attempt waits this long for the catalog's answer
STEP_TIMEOUT_S = 60.0  # a background attempt's wait (a step may delete a large file)
RETRY_MIN_S = 1.0
RETRY_MAX_S = 10.0


class StepStore(Protocol):
    """What `PendingSteps` needs of compute_node.store.Store."""

    def add_storage_steps(self, steps: list[tuple[str, LiveMoveVolume]]) -> list[int]: ...

    def storage_steps(self) -> list[tuple[int, str, LiveMoveVolume]]: ...

    def storage_step_done(self, row: int) -> None: ...

    def storage_step_renamed(self, row: int, message_id: str) -> None: ...


class PendingSteps:
    """The store's pending storage steps and the thread that sends them."""

    def __init__(self, store: StepStore, send: Callable[[], Send | None]) -> None:
        self._store = store
        # No lock between the job's attempt and the thread's: a step sent twice at once
        # under one message id runs once.
        self._send = send
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, steps: list[LiveMoveVolume]) -> list[int]:
        """Keep `steps` (durably, each with the message id it is sent under); the rows."""
        return self._store.add_storage_steps([(str(uuid.uuid4()), s) for s in steps])

    def send_now(self, rows: list[int], timeout: float = FIRST_TRY_S) -> bool:
        """One attempt at `rows` now (the job's own, not waiting long); True when all were
        answered. What is left is the thread's to resend."""
        pending = [s for s in self._store.storage_steps() if s[0] in rows]
        left = [row for row, mid, step in pending if not self._try(row, mid, step, timeout)]
        if left:
            self._wake.set()
        return not left

    def wake(self) -> None:
        """Have the thread send what is pending now."""
        self._wake.set()

    def start(self) -> PendingSteps:
        """Send what the store holds, and from then on what is added, until `stop`."""
        self._thread = threading.Thread(target=self._run, name="storage-steps", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)  # a call under way is left to end with the process

    def pending(self) -> int:
        return len(self._store.storage_steps())

    def _run(self) -> None:
        wait = RETRY_MIN_S
        while not self._stop.is_set():
            # Cleared before the pass, never after its wait: a wake that comes while the
            # pass runs (a step added, a job's attempt failed) brings one more pass.
            self._wake.clear()
            left = 0
            for row, message_id, step in self._store.storage_steps():
                if self._stop.is_set():
                    return
                if not self._try(row, message_id, step, STEP_TIMEOUT_S):
                    left += 1
            if left:
                woken = self._wake.wait(wait)
                wait = RETRY_MIN_S if woken else min(wait * 2, RETRY_MAX_S)
            else:
                self._wake.wait()
                wait = RETRY_MIN_S

    def _try(self, row: int, message_id: str, step: LiveMoveVolume, timeout: float) -> bool:
        """Send the step once: True when it is settled (answered, or refused for good)."""
        send = self._send()
        if send is None:
            return False
        try:
            send(routing.STORAGE_QUEUE, step, timeout, message_id)
        except RemoteError as exc:
            if exc.code == "unavailable" or exc.details.get("reason") == "busy":
                # Not done, and that answer is recorded under this message id: the next
                # try goes under a new one (a step answers a repeat as it is).
                self._store.storage_step_renamed(row, str(uuid.uuid4()))
                return False
            log.warning(
                "storage step refused",
                step=step.step,
                volume_id=str(step.volume_id),
                host=step.host,
                error=exc.message,
            )
        except BusError as exc:
            log.info(
                "storage step unanswered: resent later",
                step=step.step,
                volume_id=str(step.volume_id),
                error=str(exc),
            )
            return False
        else:
            log.info("storage step done", step=step.step, volume_id=str(step.volume_id))
        self._store.storage_step_done(row)
        return True
