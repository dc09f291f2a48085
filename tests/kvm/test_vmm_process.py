"""`python -m compute_node.vmm`: the per-guest VMM process, driven through its client.

Every test spawns a real VMM process on /dev/kvm with the test guest (docs/machine.md) and
checks what the worker relies on (docs/vmm.md): the journal, the policies the VMM applies on
its own, the control protocol and the console.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from compute_node.vmm.client import (
    JournalRecord,
    VmmClient,
    VmmGone,
    VmmRequestError,
    VmmSpawnError,
    read_journal,
    reap,
    spawn,
    wait_exit,
)
from compute_node.vmm.guest import END_AFTER_ANNOUNCING_S
from compute_node.vmm.protocol import StatusReply

READY = "flotilla-guest: READY vcpus=1 memory_mib=32"


class Domain:
    def __init__(self, path: Path, pid: int) -> None:
        self.path = path
        self.pid = pid
        self.client = VmmClient(path)

    def journal(self, from_n: int = 0) -> list[JournalRecord]:
        return read_journal(self.path / "journal", from_n)

    def kinds(self) -> list[tuple[str, str, str]]:
        return [(r["kind"], r["reason"], r["detail"]) for r in self.journal()]

    def console_text(self) -> str:
        return self.client.console(1 << 20).data.decode(errors="replace")

    def wait_console(self, pattern: str, count: int = 1, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            if len(rx.findall(text)) >= count:
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} x{count} not seen within {timeout}s; console:\n{text}")
            time.sleep(0.002)

    def wait_record(self, kind: str, timeout: float = 10.0) -> JournalRecord:
        deadline = time.monotonic() + timeout
        while True:
            for record in self.journal():
                if record["kind"] == kind:
                    return record
            if time.monotonic() > deadline:
                pytest.fail(f"no {kind!r} record within {timeout}s: {self.kinds()}")
            time.sleep(0.01)

    def wait_exit(self, timeout: float = 10.0) -> int:
        status = wait_exit(self.pid, timeout)
        if status is None:
            pytest.fail(f"VMM {self.pid} still runs after {timeout}s: {self.kinds()}")
        return status


def write_config(path: Path, kernel: Path, cmdline: str, **overrides: Any) -> None:
    config: dict[str, Any] = {
        "domain_id": path.name,
        "name": path.name,
        "kernel": str(kernel),
        "initrd": None,
        "cmdline": cmdline,
        "memory_mib": 32,
        "vcpus": 1,
        "on_poweroff": "destroy",
        "on_reboot": "restart",
        "on_crash": "destroy",
        "console_ring_bytes": 65536,
        "console_log": True,
        "start_paused": False,
    }
    config.update(overrides)
    (path / "vmm.json").write_text(json.dumps(config))


def save_and_restore(
    d: Domain, state: Path, into: Path, pids: list[int], timeout: float = 10.0
) -> Domain:
    """The compute node's save and restore (KvmDriver.save, .restore) on a bare VMM: `d`
    writes its machine into `state` and ends (exit 0), then a new VMM in the domain dir `into`
    restores it with `d`'s vmm.json otherwise; its pid is added to `pids` (the caller reaps).
    `timeout` bounds the old VMM's exit and the new one's spawn."""
    d.client.save(state)
    assert d.wait_exit(timeout) == 0
    assert d.kinds()[-1][:2] == ("stopped", "saved")
    config = json.loads((d.path / "vmm.json").read_text())
    config["restore"] = {"directory": str(state), "paused": False, "detail": "restored"}
    into.mkdir()
    (into / "vmm.json").write_text(json.dumps(config))
    pid = spawn(into, timeout=timeout)
    pids.append(pid)
    restored = Domain(into, pid)
    assert restored.journal()[0]["kind"] == "started"
    assert restored.journal()[0]["detail"] == "restored"
    return restored


@pytest.fixture
def start_vmm(kvm: None, test_guest: Path, tmp_path: Path) -> Iterator[Callable[..., Domain]]:
    """Factory: start_vmm(cmdline, name="d", **vmm_json_overrides) -> a spawned VMM."""
    pids: list[int] = []

    def _start(cmdline: str = "ready", name: str = "d", **overrides: Any) -> Domain:
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        write_config(path, test_guest, cmdline, **overrides)
        pid = spawn(path)
        pids.append(pid)
        return Domain(path, pid)

    yield _start
    for pid in pids:
        try:
            if reap(pid) is None:
                os.kill(pid, signal.SIGKILL)  # only the VMMs this test spawned
                wait_exit(pid, 5.0)
        except (ChildProcessError, ProcessLookupError):
            pass


def test_spawn_answers_status_and_boots(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    status = d.client.status()
    assert isinstance(status, StatusReply)
    assert status.state == "running"
    assert status.pid == d.pid
    assert status.journal_n == 1
    assert status.started_at > 0
    assert (d.path / "vmm.pid").read_text().strip() == str(d.pid)
    assert (d.path / "control.sock").stat().st_mode & 0o777 == 0o600
    d.wait_console(READY)
    assert d.kinds() == [("started", "", "booted")]
    assert READY in (d.path / "console.log").read_text()
    stats = d.client.stats()
    assert stats["exits"]["io"] > 0
    assert stats["console_out_bytes"] >= len(READY)


def test_pause_and_resume_are_journaled_once(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    d.client.pause()
    assert d.client.status().state == "paused"
    d.client.pause()  # a no-op: no second record
    d.client.resume()
    d.client.resume()
    assert d.client.status().state == "running"
    assert [k for k, _, _ in d.kinds()] == ["started", "paused", "resumed"]


def test_destroy_journals_and_exits(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    d.wait_console(READY)
    d.client.destroy()
    assert d.wait_exit() == 0
    assert d.kinds()[-1] == ("stopped", "destroyed", "host")
    assert not (d.path / "control.sock").exists()
    assert not (d.path / "vmm.pid").exists()
    with pytest.raises(VmmGone):
        d.client.status()


def test_guest_poweroff_with_destroy_policy_ends_the_vmm(
    start_vmm: Callable[..., Domain],
) -> None:
    d = start_vmm("ready poweroff", on_poweroff="destroy")
    assert d.wait_exit() == 0
    assert d.kinds() == [
        ("started", "", "booted"),
        ("shutdown", "acpi_s5", "guest"),
        ("stopped", "shutdown", "poweroff"),
    ]


def test_a_power_off_is_announced_before_the_machine_ends(
    start_vmm: Callable[..., Domain],
) -> None:
    # The `shutdown` record goes out and the machine is ended only a moment later, so its
    # teardown does not compete with the event on its way (guest.END_AFTER_ANNOUNCING_S).
    d = start_vmm("ready poweroff", on_poweroff="destroy", memory_mib=16)
    assert d.wait_exit() == 0
    records = {r["kind"]: r for r in d.journal()}
    gap = records["stopped"]["ts"] - records["shutdown"]["ts"]
    assert gap >= END_AFTER_ANNOUNCING_S, d.kinds()


def test_host_shutdown_with_preserve_keeps_the_vmm(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm(on_poweroff="preserve")
    d.wait_console(READY)
    # The power button is pressed, but the test guest has no ACPI interpreter to notice it.
    d.client.shutdown("acpi")
    time.sleep(0.2)
    assert d.client.status().state == "running"
    d.client.shutdown("ctrl-alt-del")
    d.wait_record("stopped")
    assert d.kinds()[1:] == [("shutdown", "acpi_s5", "host"), ("stopped", "shutdown", "poweroff")]
    assert d.client.status().state == "shutoff"
    with pytest.raises(VmmRequestError) as info:
        d.client.pause()
    assert info.value.code == "state"
    d.client.destroy()
    assert d.wait_exit() == 0
    assert d.kinds()[-1][0] == "stopped"  # nothing after the machine was gone


def test_start_paused_runs_nothing_until_resumed(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm(start_paused=True)
    assert d.client.status().state == "paused"
    time.sleep(0.1)
    assert d.console_text() == ""
    d.client.resume()
    d.wait_console(READY)
    assert [k for k, _, _ in d.kinds()] == ["started", "paused", "resumed"]


def test_sigterm_destroys(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    os.kill(d.pid, signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.kinds()[-1] == ("stopped", "destroyed", "signal SIGTERM")


def test_ctrl_alt_del_reboot_of_a_guest_that_powers_off(
    start_vmm: Callable[..., Domain],
) -> None:
    # The test guest powers off on Ctrl-Alt-Del; a host reboot request still reboots it.
    d = start_vmm()
    d.wait_console(READY)
    d.client.reboot("ctrl-alt-del")
    d.wait_console(READY, count=2)
    assert d.kinds()[1] == ("rebooted", "host", "guest powered off (acpi_s5)")
    assert d.client.status().state == "running"


def test_guest_reboot_restarts_in_process(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm("ready reboot", on_reboot="restart")
    d.wait_console(READY, count=2)
    rebooted = d.wait_record("rebooted")
    assert rebooted["reason"] == "i8042_reset"
    assert rebooted["detail"] == "guest"
    assert d.client.status().pid == d.pid
    d.client.destroy()
    assert d.wait_exit() == 0


def test_panic_with_restart_policy(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm("ready panic", on_crash="restart")
    d.wait_console(READY, count=2)
    d.client.destroy()
    assert d.wait_exit() == 0
    kinds = d.kinds()
    assert kinds[1] == ("crashed", "pvpanic", "vcpu 0")
    assert kinds[2] == ("started", "crash", "restarted")
    ns = [r["n"] for r in d.journal()]
    assert ns == list(range(1, len(ns) + 1))


def test_panic_with_preserve_policy_keeps_it_crashed(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm("ready panic", on_crash="preserve")
    d.wait_record("crashed")
    assert d.client.status().state == "crashed"
    with pytest.raises(VmmRequestError):
        d.client.resume()
    d.client.destroy()
    assert d.wait_exit() == 0
    assert d.kinds()[-1] == ("stopped", "destroyed", "host")


def test_subscribe_sees_live_records_and_eof_on_death(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    with d.client.subscribe(0) as sub:
        first = sub.next_record(5.0)
        assert first is not None
        assert first["kind"] == "started"
        assert sub.next_record(0.05) is None  # nothing more yet
        d.client.pause()
        live = sub.next_record(5.0)
        assert live is not None
        assert (live["n"], live["kind"]) == (2, "paused")
        os.kill(d.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(VmmGone):
            sub.next_record(5.0)
        assert time.monotonic() - t0 < 1.0
    assert d.wait_exit() == -signal.SIGKILL
    with pytest.raises(VmmGone):
        d.client.status()


def test_journal_n_continues_across_restarts(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    d.wait_console(READY)
    d.client.reboot("reset")  # in-process restart
    d.wait_console(READY, count=2)
    d.client.destroy()
    d.wait_exit()
    again = start_vmm()  # same domain dir, a new VMM process
    again.wait_console(READY)
    assert [(r["n"], r["kind"]) for r in again.journal()] == [
        (1, "started"),
        (2, "rebooted"),
        (3, "stopped"),
        (4, "started"),
    ]
    assert again.client.status().journal_n == 4
    with again.client.subscribe(3) as sub:
        record = sub.next_record(5.0)
        assert record is not None
        assert record["n"] == 4


def test_a_torn_journal_tail_is_dropped(start_vmm: Callable[..., Domain], tmp_path: Path) -> None:
    path = tmp_path / "torn"
    path.mkdir()
    good = msgpack.packb({"n": 5, "ts": 1.0, "kind": "stopped", "reason": "x", "detail": ""})
    # A record cut short by a crash mid-append follows the last whole one.
    (path / "journal").write_bytes(struct.pack(">I", len(good)) + good + b"\x00\x00\x00\x40ab")
    assert [r["n"] for r in read_journal(path / "journal")] == [5]
    d = start_vmm(name="torn")
    assert [(r["n"], r["kind"]) for r in d.journal()] == [(5, "stopped"), (6, "started")]


def _raw(d: Domain) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(str(d.path / "control.sock"))
    return sock


def _reply(sock: socket.socket) -> dict[str, Any] | None:
    buf = b""
    while True:
        if len(buf) >= 4:
            (size,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + size:
                reply: dict[str, Any] = msgpack.unpackb(buf[4 : 4 + size])
                return reply
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk


def test_bad_frames_do_not_hurt_the_vmm(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm()
    with _raw(d) as s:  # a length far past the request limit
        s.sendall(struct.pack(">I", 1 << 30))
        reply = _reply(s)
        assert reply is not None
        assert reply["code"] == "bad_frame"
        assert _reply(s) is None  # then it hangs up
    with _raw(d) as s:  # not msgpack
        s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        reply = _reply(s)
        assert reply is not None
        assert reply["code"] == "bad_frame"
    with _raw(d) as s:  # msgpack, but not a map
        body = msgpack.packb([1, 2, 3])
        s.sendall(struct.pack(">I", len(body)) + body)
        reply = _reply(s)
        assert reply is not None
        assert reply["code"] == "bad_frame"
    with _raw(d) as s:  # unknown op and bad arguments keep the connection
        for request in ({"op": "fly"}, {"nop": 1}, {"op": "console", "max_bytes": "x"}):
            body = msgpack.packb(request)
            s.sendall(struct.pack(">I", len(body)) + body)
            reply = _reply(s)
            assert reply is not None
            assert reply["ok"] is False
        body = msgpack.packb({"op": "status"})
        s.sendall(struct.pack(">I", len(body)) + body)
        reply = _reply(s)
        assert reply is not None
        assert reply["state"] == "running"
    with _raw(d) as s:  # half a frame, then gone
        s.sendall(struct.pack(">I", 100) + b"\x81")
    assert d.client.status().state == "running"
    assert reap(d.pid) is None


def kill_vmms(pids: list[int]) -> None:
    """Ends the VMMs a test spawned itself (by pid), reaping each."""
    for pid in pids:
        try:
            if reap(pid) is None:
                os.kill(pid, signal.SIGKILL)  # only the VMMs this test spawned
                wait_exit(pid, 5.0)
        except (ChildProcessError, ProcessLookupError):
            pass


def type_echoed(d: Domain, line: str, timeout: float = 5.0) -> None:
    """Types `line` on the VMM's console; returns once the guest echoed it back."""
    with d.client.attach() as stream:
        stream.settimeout(timeout)
        stream.sendall(line.encode() + b"\r")
        got = b""
        while f"flotilla-guest: {line}".encode() not in got:
            chunk = stream.recv(4096)
            assert chunk, f"attach stream closed; got {got!r}"
            got += chunk


def test_a_saved_vmm_restored_by_a_new_process_goes_on_with_its_console(
    start_vmm: Callable[..., Domain], tmp_path: Path
) -> None:
    """What the hwvirt Linux check does (tests/hwvirt/test_linux_guest.py), on the test
    guest: 256 MiB, 2 vCPUs, counting, its console input on (the shell's path)."""
    d = start_vmm("ready echo counter", memory_mib=256, vcpus=2)
    d.wait_console(r"COUNTER 5\b")
    type_echoed(d, "before save")
    pids: list[int] = []
    try:
        restored = save_and_restore(d, tmp_path / "state", tmp_path / "restored", pids)
        assert restored.client.status().state == "running"
        text = restored.wait_console(r"COUNTER \d+", count=3)
        # It counts on from where it was saved: no boot, no READY, the counter past 5.
        assert "READY" not in text, text
        assert min(int(n) for n in re.findall(r"COUNTER (\d+)", text)) > 5, text
        type_echoed(restored, "after restore")
        restored.client.destroy()
        assert restored.wait_exit() == 0
    finally:
        kill_vmms(pids)


def test_console_attach_echoes_input(start_vmm: Callable[..., Domain]) -> None:
    d = start_vmm("ready echo")
    d.wait_console(READY)
    with d.client.attach() as stream:
        with pytest.raises(VmmRequestError) as info:
            d.client.attach()
        assert info.value.code == "busy"
        stream.settimeout(5.0)
        stream.sendall(b"ping 42\r")
        got = b""
        while b"flotilla-guest: ping 42" not in got:
            chunk = stream.recv(4096)
            assert chunk, f"attach stream closed; got {got!r}"
            got += chunk
    # Detached: the next client may attach.
    deadline = time.monotonic() + 5
    while True:
        try:
            d.client.attach().close()
            break
        except VmmRequestError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert "flotilla-guest: ping 42" in d.console_text()


def test_configuration_failure_is_journaled(test_guest: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.mkdir()
    write_config(path, tmp_path / "missing.elf", "ready")
    with pytest.raises(VmmSpawnError) as info:
        spawn(path)
    assert "missing.elf" in info.value.reason
    records = read_journal(path / "journal")
    assert [r["kind"] for r in records] == ["failed"]
    assert not (path / "control.sock").exists()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def test_spawn_to_ready_latency_and_rss(
    start_vmm: Callable[..., Domain], capsys: pytest.CaptureFixture[str]
) -> None:
    latencies, ready_only, rss = [], [], []
    for i in range(10):
        t0 = time.monotonic()
        d = start_vmm(name=f"lat{i}")
        t1 = time.monotonic()
        d.wait_console(READY)
        t2 = time.monotonic()
        latencies.append(t2 - t0)
        ready_only.append(t1 - t0)
        rss.append(_rss_kib(d.pid))
        d.client.destroy()
        d.wait_exit()
    median = statistics.median(latencies)
    with capsys.disabled():
        print(
            f"\nVMM spawn -> READY: median {median * 1000:.1f} ms "
            f"(spawn() returns after {statistics.median(ready_only) * 1000:.1f} ms), "
            f"min {min(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
            f"VMM RSS median {statistics.median(rss) / 1024:.1f} MiB"
        )
    assert median < 2.0
