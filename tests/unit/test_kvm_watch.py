"""The KVM driver's journal watch, without KVM: closing the driver while a watch's thread has
just closed its subscription (the VMM ended) must not fail; a VMM that waited for an incoming
migration and ended before its guest started is no death."""

from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path

from compute_node.kvm import KvmDriver
from compute_node.vmm.client import VmmClient, VmmSubscription, read_journal
from compute_node.vmm.frames import CONTROL_SOCKET, JOURNAL, FrameReader, Journal, pack_frame
from compute_node.vmm_watch import Watch


def test_stopping_a_watch_whose_subscription_is_closed_is_quiet(tmp_path: Path) -> None:
    driver = KvmDriver(tmp_path / "domains")
    watch = Watch(driver, uuid.uuid4(), tmp_path, None)
    ours, theirs = socket.socketpair()
    watch._sub = VmmSubscription(ours, FrameReader(1024))
    ours.close()  # as the watch thread does when the VMM's journal ends
    try:
        watch.stop()
        assert watch.closing
    finally:
        theirs.close()


def test_a_vmm_that_ended_before_its_incoming_guest_started_reports_no_death(
    tmp_path: Path,
) -> None:
    """A VMM waiting for an incoming migration ends with no record when the stream fails:
    its watch adds none either. One that started its guest and then died is reported."""
    driver = KvmDriver(tmp_path / "domains")
    events: list[tuple[str, str]] = []
    driver.set_event_sink(lambda e: events.append((e.kind.value, e.reason)))
    domain = uuid.uuid4()
    directory = driver.directory(domain)
    directory.mkdir(parents=True)
    silent = Watch(driver, domain, directory, None, incoming=True)
    silent.ended()
    assert events == []
    assert read_journal(str(directory / JOURNAL)) == []
    journal = Journal(str(directory / JOURNAL))
    journal.append("started", "migrated")
    journal.close()
    after = Watch(driver, domain, directory, None, incoming=True)
    after.ended()
    assert events == [("started", "migrated"), ("stopped", "failed")]


def _answer_subscribe(path: Path, reply: dict[str, object]) -> threading.Thread:
    """A control socket at `path` that answers one request with `reply`, then closes."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            conn.recv(4096)  # the Subscribe frame
            conn.sendall(pack_frame(reply))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_subscription_says_where_the_journal_stood_or_none_from_an_older_vmm(
    tmp_path: Path,
) -> None:
    """The start waits for the stream to reach the journal's last record as the subscription
    began (`Done.journal_n`); a VMM that does not say gets a `Status` instead (None here)."""
    for reply, expected in (
        ({"ok": True, "reply": "done", "journal_n": 7}, 7),
        ({"ok": True, "reply": "done"}, None),
    ):
        directory = tmp_path / f"d{expected}"
        directory.mkdir()
        server = _answer_subscribe(directory / CONTROL_SOCKET, reply)
        sub = VmmClient(directory).subscribe(3)
        try:
            assert sub.journal_n == expected
        finally:
            sub.close()
            server.join(5)
