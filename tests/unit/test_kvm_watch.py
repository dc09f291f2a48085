"""The KVM driver's journal watch, without KVM: closing the driver while a watch's thread has
just closed its subscription (the VMM ended) must not fail."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from compute_node.kvm import KvmDriver, _Watch
from compute_node.vmm.client import VmmSubscription
from compute_node.vmm.frames import FrameReader


def test_stopping_a_watch_whose_subscription_is_closed_is_quiet(tmp_path: Path) -> None:
    driver = KvmDriver(tmp_path / "domains")
    watch = _Watch(driver, uuid.uuid4(), tmp_path, None)
    ours, theirs = socket.socketpair()
    watch._sub = VmmSubscription(ours, FrameReader(1024))
    ours.close()  # as the watch thread does when the VMM's journal ends
    try:
        watch.stop()
        assert watch.closing
    finally:
        theirs.close()
