"""A VMM launched for an incoming migration (docs/vmm.md, "Live migration") makes no machine
until the source commits, so these need no KVM: it reports its port with its readiness,
refuses what would change a machine it does not have, journals nothing, and ends silently
on CancelIncoming or SIGTERM; a listen address it cannot bind fails its start."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.vmm import protocol as p
from compute_node.vmm.client import (
    VmmClient,
    VmmRequestError,
    VmmSpawnError,
    end,
    read_journal,
    spawn,
    wait_exit,
)
from compute_node.vmm.config import IncomingConfig, LaunchConfig

TOKEN = "5a" * 32


def config(address: str = "127.0.0.1") -> LaunchConfig:
    return LaunchConfig(
        domain_id="d-incoming",
        name="incoming",
        kernel="/nonexistent/guest.elf",  # never read: the machine comes from the stream
        initrd=None,
        cmdline="",
        disks=[],
        memory_mib=32,
        vcpus=1,
        on_poweroff="destroy",
        on_reboot="restart",
        on_crash="destroy",
        console_ring_bytes=65536,
        console_log=True,
        start_paused=False,
        cgroup=None,
        incoming=IncomingConfig(address, 0, TOKEN, False, 60.0),
    )


@pytest.fixture
def domain(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "d"
    directory.mkdir()
    yield directory
    end(directory)  # whatever a failed test left running


def test_a_waiting_vmm_reports_its_port_and_ends_silently_when_cancelled(domain: Path) -> None:
    config().write(str(domain))
    pid = spawn(domain)
    client = VmmClient(domain)
    status = client.status()
    assert status.state == "shutoff"
    assert status.incoming_port is not None
    assert status.incoming_port > 0
    # The port is its listener's: a hello with another token is refused with the reason (the
    # token is checked before anything is built), and the listener waits on.
    with socket.create_connection(("127.0.0.1", status.incoming_port), timeout=5) as conn:
        conn.sendall(b"FLTLMIGR" + struct.pack("<II", 2, 0) + bytes.fromhex("a5" * 32))
        header = conn.recv(16, socket.MSG_WAITALL)
        kind, _, length = struct.unpack("<IIQ", header)
        assert kind == 19  # ERROR
        assert conn.recv(length, socket.MSG_WAITALL) == b"wrong migration token"
    assert client.status().incoming_port == status.incoming_port
    for request in (p.Pause(), p.Resume(), p.Reboot("reset"), p.Save("/tmp/x")):
        with pytest.raises(VmmRequestError) as refused:
            client.request(request)
        assert refused.value.code == "state"
    with pytest.raises(VmmRequestError) as none:
        client.request(p.MigrationStatus())
    assert none.value.code == "state"
    client.request(p.CancelIncoming())
    assert wait_exit(pid, 10) == 0
    assert read_journal(str(domain / "journal")) == []


def test_sigterm_ends_a_waiting_vmm_without_a_record(domain: Path) -> None:
    config().write(str(domain))
    pid = spawn(domain)
    os.kill(pid, 15)
    assert wait_exit(pid, 10) == 0
    assert read_journal(str(domain / "journal")) == []


def test_a_listen_address_it_cannot_bind_fails_the_start(domain: Path) -> None:
    # TEST-NET-3: no interface of this host has it, so the bind fails (nothing is sent).
    config("203.0.113.7").write(str(domain))
    with pytest.raises(VmmSpawnError, match="cannot listen for the migration"):
        spawn(domain)
    assert [r["kind"] for r in read_journal(str(domain / "journal"))] == ["failed"]
