"""A live move's catalog commit (or abort) kept in the node's store and resent until the
catalog answers (compute_node/storage_steps.py), on a real store; the storage service is a
function here (the broker and the service: tests/integration/test_storage_volume_move.py)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from compute_node.storage_steps import PendingSteps, Send
from compute_node.store import Store
from protos import routing
from protos.base import Message
from protos.commands import Command
from protos.volumes import LiveMoveVolume, Volume
from services.bus.errors import RemoteError, RpcTimeout


def commit(host: str = "node-b") -> LiveMoveVolume:
    return LiveMoveVolume(volume_id=uuid.uuid4(), host=host, step="commit")


def abort(host: str = "node-b") -> LiveMoveVolume:
    return LiveMoveVolume(volume_id=uuid.uuid4(), host=host, step="abort")


class Catalog:
    """Answers a step once it is `up` (a refusal `refuse` if set); records what came."""

    def __init__(self) -> None:
        self.up = False
        self.refuse: RemoteError | None = None
        self.calls: list[tuple[str, uuid.UUID, str | None]] = []
        self.answered = threading.Event()

    def __call__(
        self, queue: str, command: Command, timeout: float, message_id: str | None
    ) -> Message:
        del timeout
        assert queue == routing.STORAGE_QUEUE
        assert isinstance(command, LiveMoveVolume)
        self.calls.append((command.step, command.volume_id, message_id))
        if not self.up:
            raise RpcTimeout("no reply")
        if self.refuse is not None:
            raise self.refuse
        self.answered.set()
        return Volume(
            volume_id=command.volume_id,
            project="p",
            name="v",
            pool="local",
            host=command.host,
            size=1 << 20,
            state="attached",
            seq=3,
            created_at=time.time(),
        )


def store(path: Path) -> Store:
    return Store(path / "compute.db", host="node-a", source="compute:node-a")


def test_a_commit_is_on_disk_before_it_is_sent_and_outlives_a_restart(tmp_path: Path) -> None:
    catalog = Catalog()
    first = store(tmp_path)
    steps = PendingSteps(first, lambda: catalog)
    step = commit()
    rows = steps.add([step])
    assert not steps.send_now(rows, timeout=0.1)  # unanswered: kept
    first.close()
    # The node restarts: the step is there, under the message id it was first sent with.
    again = store(tmp_path)
    try:
        [(_, message_id, kept)] = again.storage_steps()
        assert kept == step
        assert catalog.calls == [("commit", step.volume_id, message_id)]
        catalog.up = True
        sender = PendingSteps(again, lambda: catalog).start()
        try:
            assert catalog.answered.wait(5)
            deadline = time.monotonic() + 5
            while again.storage_steps():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            sender.stop()
        assert {mid for _, _, mid in catalog.calls} == {message_id}  # one request id, resent
    finally:
        again.close()


def test_it_is_resent_until_the_catalog_answers(tmp_path: Path) -> None:
    catalog = Catalog()
    s = store(tmp_path)
    sender = PendingSteps(s, lambda: catalog).start()
    try:
        rows = sender.add([commit()])
        assert not sender.send_now(rows, timeout=0.1)
        time.sleep(2.5)  # resent meanwhile (1 s, then 2 s apart)
        assert len(catalog.calls) >= 2
        catalog.up = True
        sender.wake()
        assert catalog.answered.wait(5)
        deadline = time.monotonic() + 5
        while sender.pending():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        sender.stop()
        s.close()


def test_busy_is_resent_and_a_final_refusal_is_dropped(tmp_path: Path) -> None:
    catalog = Catalog()
    catalog.up = True
    s = store(tmp_path)
    try:
        steps = PendingSteps(s, lambda: catalog)
        catalog.refuse = RemoteError("conflict", "a VMM still holds it", {"reason": "busy"})
        rows = steps.add([commit()])
        assert not steps.send_now(rows)
        assert steps.pending() == 1
        # The busy answer is recorded under that message id: the next try has a new one.
        catalog.refuse = None
        assert steps.send_now(rows)
        first, second = (mid for _, _, mid in catalog.calls)
        assert first != second
        rows = steps.add([abort()])
        catalog.refuse = RemoteError("conflict", "nothing to commit", {"reason": "state"})
        assert steps.send_now(rows)
        assert steps.pending() == 0
        no_bus: Send | None = None
        unsent = PendingSteps(s, lambda: no_bus)
        assert not unsent.send_now(unsent.add([commit()]))  # no bus yet: kept
        assert unsent.pending() == 1
    finally:
        s.close()
