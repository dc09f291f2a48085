"""Snapshots of real guests (docs/machine.md, "Snapshots"): save a paused machine, restore it
into a new one, and refuse every damaged or foreign snapshot without changing anything."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native
from tests.fds import open_fds
from tests.kvm.harness import Booted, Console

HEADER = 72  # struct fl_snap_header
SECTION = 24  # struct fl_snap_section_header
TRAILER = 72  # struct fl_snap_mem_trailer, the memory file's last bytes
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def sections(state: bytes) -> list[tuple[int, int, int, int]]:
    """(type, instance, offset of the section header, payload length) of each section."""
    (nsections,) = struct.unpack_from("<I", state, 20)
    out, off = [], HEADER
    for _ in range(nsections):
        kind, instance, length = struct.unpack_from("<IIQ", state, off)
        out.append((kind, instance, off, length))
        off += SECTION + ((length + 7) & ~7)
    return out


def memtest_checksum(machine: native.Machine, base: int, mib: int) -> int:
    """The guest's MEMTEST checksum (sum of the region's 64-bit words) from host memory."""
    total = 0
    for off in range(0, mib * MIB, 4 * MIB):
        chunk = machine.read_memory(base + off, 4 * MIB)
        total += sum(struct.unpack(f"<{len(chunk) // 8}Q", chunk))
    return total % (1 << 64)


def ram_digest(machine: native.Machine) -> str:
    h = hashlib.sha256()
    for off in range(0, machine.memory_mib * MIB, 8 * MIB):
        h.update(machine.read_memory(off, 8 * MIB))
    return h.hexdigest()


def last_counter(text: str) -> int:
    return int(re.findall(r"COUNTER (\d+)", text)[-1])


@pytest.fixture
def restored(kvm: None) -> Iterator[Callable[..., Booted]]:
    """Factory: restored(snapshot_dir, start=True) -> a machine restored with its console."""
    made: list[Booted] = []

    def _restore(snapshot: Path, *, start: bool = True) -> Booted:
        console = Console()
        try:
            machine = native.Machine.restore(
                snapshot, console_out=console.write_fd, console_in=console.input_fd
            )
        except BaseException:
            console.close()
            raise
        booted = Booted(machine, console)
        made.append(booted)
        if start:
            machine.start()
        return booted

    yield _restore
    for b in made:
        b.machine.close()
        b.console.close()


@pytest.fixture
def saved(
    boot: Callable[..., Booted], test_guest: Path, tmp_path: Path
) -> tuple[Booted, Path, int, int]:
    """A 2-vCPU guest that ran memtest and counts, paused and saved to tmp_path/snap.
    Returns (the paused original, the snapshot, the memtest base, its checksum)."""
    g = boot(test_guest, "ready echo memtest=16 counter", vcpus=2, memory_mib=128)
    m = g.console.wait_for(r"MEMTEST mib=16 base=0x([0-9a-f]+) checksum=0x([0-9a-f]{16})")
    g.console.wait_for(r"COUNTER 3\b")
    g.machine.pause()
    snap = tmp_path / "snap"
    g.machine.save(snap)
    return g, snap, int(m.group(1), 16), int(m.group(2), 16)


def test_restore_continues_the_guest(
    saved: tuple[Booted, Path, int, int], restored: Callable[..., Booted]
) -> None:
    original, snap, base, checksum = saved
    before = last_counter(original.console.drain())
    digest = ram_digest(original.machine)
    info = native.snapshot_info(snap)
    assert (info.kind, info.vcpus, info.memory_mib, info.version) == ("full", 2, 128, 1)

    new = restored(snap, start=False)
    # Guest RAM is the saved RAM, byte for byte, before the guest runs again.
    assert ram_digest(new.machine) == digest
    assert memtest_checksum(new.machine, base, 16) == checksum
    new.machine.start()
    new.console.wait_for(rf"COUNTER {before + 3}\b")
    text = new.console.text
    # It counts on from where it was: no re-boot, no restart of the counter.
    assert "READY" not in text
    assert "MEMTEST" not in text
    first = int(re.findall(r"COUNTER (\d+)", text)[0])
    assert first in (before, before + 1), text[:200]
    # The console continues both ways: COM1 input reaches the restored guest's echo.
    new.console.send(b"after restore\r")
    new.console.wait_for(r"flotilla-guest: after restore")
    # The original is untouched by all this and runs on too.
    original.machine.resume()
    original.console.wait_for(rf"COUNTER {before + 3}\b")


def resealed(state: bytearray, off: int, length: int) -> None:
    """Writes the CRC of the section at `off` again after its payload was edited."""
    end = off + SECTION + ((length + 7) & ~7)
    struct.pack_into("<I", state, off + 16, 0)
    struct.pack_into("<I", state, off + 16, crc32c(bytes(state[off:end])))


def test_console_input_that_came_between_the_vcpus_and_the_uart_still_interrupts(
    boot: Callable[..., Booted],
    test_guest: Path,
    restored: Callable[..., Booted],
    tmp_path: Path,
) -> None:
    """A save takes the vCPUs (their local APICs) before the IOAPIC and the UART. Input that
    reaches the UART in between is in the snapshot with COM1's line up, but the local APIC
    in it never heard of the interrupt. COM1 is an edge pin: unless the restore gives the
    pin its edge again, the guest never reads that input, nor any after it (the line stays
    up). Made here without a race: the saved UART's FIFO is given five bytes and its line
    raised in the IOAPIC section, the vCPUs left as saved. The guest counts nothing: it
    sleeps until an interrupt wakes it, so only COM1's interrupt can bring it the input."""
    g = boot(test_guest, "ready echo", vcpus=2)
    g.console.wait_for(r"flotilla-guest: READY")
    time.sleep(0.2)  # into its idle loop's wait
    g.machine.pause()
    snap = tmp_path / "snap"
    g.machine.save(snap)
    state = bytearray((snap / "state").read_bytes())
    by_kind = {kind: (off, length) for kind, _, off, length in sections(bytes(state))}
    off, length = by_kind[4]  # the UART
    assert length == 84, length  # struct fl_serial_state
    payload = off + SECTION
    assert state[payload] & 0x01, "the guest has not enabled COM1's receive interrupt"
    assert struct.unpack_from("<I", state, payload + 80) == (0,)  # rx_count: nothing typed
    state[payload + 10 : payload + 15] = b"late\r"
    struct.pack_into("<II", state, payload + 76, 0, 5)  # rx_head, rx_count
    resealed(state, off, length)
    off, length = by_kind[3]  # the IOAPIC: COM1's line (pin 4) up
    assert length == 208, length  # struct fl_ioapic_state
    (lines,) = struct.unpack_from("<I", state, off + SECTION + 200)
    struct.pack_into("<I", state, off + SECTION + 200, lines | 1 << 4)
    resealed(state, off, length)
    edited = tmp_path / "edited"
    edited.mkdir()
    os.link(snap / "memory", edited / "memory")
    (edited / "state").write_bytes(state)
    new = restored(edited)
    new.console.wait_for(r"flotilla-guest: late", timeout=10)
    new.console.send(b"and more\r")
    new.console.wait_for(r"flotilla-guest: and more")


def test_a_restored_machine_saves_whole_again(
    saved: tuple[Booted, Path, int, int], restored: Callable[..., Booted], tmp_path: Path
) -> None:
    """Its RAM maps the first snapshot's file: pages it never touched come from that file
    (holes stay holes), pages it wrote from its own copies."""
    _, snap, base, checksum = saved
    first = restored(snap)
    first.console.wait_for(r"COUNTER \d+")
    first.console.send(b"x\r")
    first.console.wait_for(r"flotilla-guest: x")
    first.machine.pause()
    stats = first.machine.save(tmp_path / "again")
    digest = ram_digest(first.machine)
    assert stats.memory_pages < 128 * 256 // 2, stats  # zero pages are still holes
    second = restored(tmp_path / "again", start=False)
    assert ram_digest(second.machine) == digest
    assert memtest_checksum(second.machine, base, 16) == checksum
    second.machine.start()
    second.console.wait_for(r"COUNTER \d+")


def test_every_corrupted_byte_of_a_section_is_refused(
    saved: tuple[Booted, Path, int, int], restored: Callable[..., Booted], tmp_path: Path
) -> None:
    original, snap, _, _ = saved
    state = (snap / "state").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    os.link(snap / "memory", bad / "memory")
    secs = sections(state)
    assert {s[0] for s in secs} == set(range(1, 8)), secs  # config..clock; no virtio here
    assert sum(1 for s in secs if s[0] == 2) == 2  # one per vCPU
    # One byte in the header, each section's header and each section's payload (first,
    # middle and last byte), each on its own.
    offsets = [0, 8, 20, 40, 68]
    for _, _, off, length in secs:
        offsets += [off, off + 8, off + 16, off + SECTION, off + SECTION + length // 2]
        offsets.append(off + SECTION + length - 1)
    fds = open_fds()
    for off in offsets:
        damaged = bytearray(state)
        damaged[off] ^= 0x01
        (bad / "state").write_bytes(damaged)
        with pytest.raises(native.SnapshotError) as exc:
            restored(bad)
        why = r"checksum|magic|section|past the end|truncated|bytes after"
        assert re.search(why, str(exc.value)), (
            off,
            exc.value,
        )
    # Refusals leave nothing behind in this process (no fd, no machine, no thread)...
    assert open_fds() - fds == set()
    # ...and the snapshot itself still restores.
    restored(snap).console.wait_for(r"COUNTER \d+")
    original.machine.resume()


def test_truncated_or_newer_state_files_are_refused(
    saved: tuple[Booted, Path, int, int], restored: Callable[..., Booted], tmp_path: Path
) -> None:
    _, snap, _, _ = saved
    state = (snap / "state").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()

    def refused(pattern: str) -> None:
        with pytest.raises(native.SnapshotError, match=pattern):
            restored(bad)

    os.link(snap / "memory", bad / "memory")
    for cut in (0, 10, HEADER, HEADER + 100, len(state) // 2, len(state) - 1):
        (bad / "state").write_bytes(state[:cut])
        refused("truncated|past the end|header")
    (bad / "state").write_bytes(state + b"\0" * 8)
    refused("bytes")

    # A newer format version, with a valid header checksum: refused as newer.
    newer = bytearray(state)
    struct.pack_into("<I", newer, 8, 2)
    struct.pack_into("<I", newer, 68, 0)
    struct.pack_into("<I", newer, 68, crc32c(bytes(newer[:HEADER])))
    (bad / "state").write_bytes(newer)
    refused("newer")


def test_bad_memory_files_and_other_configs_are_refused(
    saved: tuple[Booted, Path, int, int],
    restored: Callable[..., Booted],
    boot: Callable[..., Booted],
    test_guest: Path,
    tmp_path: Path,
) -> None:
    _, snap, _, _ = saved
    memory = snap / "memory"
    bad = tmp_path / "bad"
    bad.mkdir()

    def refused(pattern: str) -> None:
        with pytest.raises(native.SnapshotError, match=pattern):
            restored(bad)

    # The memory file: truncated, its trailer damaged, or another snapshot's.
    os.link(snap / "state", bad / "state")
    size = memory.stat().st_size
    with memory.open("rb") as src, (bad / "memory").open("wb") as dst:
        src.seek(size - 4096)
        tail = src.read()
        dst.truncate(size - MIB)
        dst.seek(size - MIB - 4096)
        dst.write(tail)
    refused("memory file")
    raw = bytearray(tail)
    raw[-TRAILER + 16] ^= 0x80  # a byte of the id: the trailer's checksum catches it
    with (bad / "memory").open("wb") as dst:
        dst.truncate(size - 4096)
        dst.seek(size - 4096)
        dst.write(raw)
    refused("checksum")
    other = boot(test_guest, "ready", memory_mib=128, vcpus=2)
    other.console.wait_for("READY")
    other.machine.pause()
    other.machine.save(tmp_path / "other")
    (bad / "memory").unlink()
    os.link(tmp_path / "other" / "memory", bad / "memory")
    refused("another snapshot")

    # Another machine config: a disk the snapshot does not have.
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * MIB)
    with pytest.raises(native.SnapshotError, match="virtio devices"):
        native.Machine.restore(snap, disks=[native.Disk(str(disk))])
    # Save refuses a running machine.
    other.machine.resume()
    with pytest.raises(native.MachineStateError, match="paused"):
        other.machine.save(tmp_path / "running")
    assert not (tmp_path / "running" / "state").exists()


def test_diff_snapshot_restores_what_the_guest_wrote(
    boot: Callable[..., Booted], restored: Callable[..., Booted], test_guest: Path, tmp_path: Path
) -> None:
    g = boot(test_guest, "ready sleep=3000 memtest=24 counter", vcpus=2, memory_mib=128)
    g.console.wait_for("READY")
    g.machine.pause()
    with pytest.raises(native.MachineStateError, match="diff against"):
        g.machine.save(tmp_path / "early", diff=True)
    full = g.machine.save(tmp_path / "base")
    g.machine.resume()
    m = g.console.wait_for(r"MEMTEST mib=24 base=0x([0-9a-f]+) checksum=0x([0-9a-f]{16})")
    assert "SLEPT" in g.console.text  # the base was taken before memtest wrote a byte
    g.console.wait_for(r"COUNTER 2\b")
    g.machine.pause()
    diff = g.machine.save(tmp_path / "diff", diff=True)
    # The diff holds what the guest wrote (24 MiB and a little more), not the whole RAM.
    assert 24 * 256 <= diff.memory_pages < 24 * 256 + 512, diff
    assert diff.memory_pages < full.memory_pages + 24 * 256
    info = native.snapshot_info(tmp_path / "diff")
    assert info.kind == "diff"
    assert info.parent == native.snapshot_info(tmp_path / "base").id
    with pytest.raises(native.SnapshotError, match="merge"):
        restored(tmp_path / "diff")
    digest = ram_digest(g.machine)
    before = last_counter(g.console.drain())

    native.merge_snapshot(tmp_path / "base", tmp_path / "diff")
    new = restored(tmp_path / "diff", start=False)
    assert ram_digest(new.machine) == digest
    assert memtest_checksum(new.machine, int(m.group(1), 16), 24) == int(m.group(2), 16)
    new.machine.start()
    new.console.wait_for(rf"COUNTER {before + 2}\b")
    assert "READY" not in new.console.text

    # A diff of the restored machine chains on: its parent is the snapshot it came from.
    new.machine.pause()
    again = new.machine.save(tmp_path / "diff2", diff=True)
    assert again.memory_pages < 256, again
    assert native.snapshot_info(tmp_path / "diff2").parent == info.id
    with pytest.raises(native.SnapshotError, match="not a diff of"):
        native.merge_snapshot(tmp_path / "base", tmp_path / "diff2", tmp_path / "x")


_SAVER = textwrap.dedent(
    """
    import os, sys
    import native
    guest, out = sys.argv[1], sys.argv[2]
    r, w = os.pipe()
    m = native.Machine(
        guest, cmdline="ready memtest=200 counter", memory_mib=256, vcpus=2, console_out=w
    )
    m.start()
    seen = b""
    while b"COUNTER 1" not in seen:  # memtest done: 200 MiB to save each time
        seen += os.read(r, 4096)
    m.pause()
    for i in range(1000):
        print(f"saving {i}", flush=True)
        m.save(f"{out}/s{i}")
    """
)


@pytest.mark.slow
def test_kill_during_save_leaves_no_valid_looking_snapshot(
    kvm: None, test_guest: Path, tmp_path: Path, restored: Callable[..., Booted]
) -> None:
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(test_guest), str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("saving 2"):
                break
        # Into the third save's writing (its temporaries are there; 200 MiB take far longer
        # than the wait), a little further each attempt. A fixed sleep after the line could
        # land between two saves on a loaded host.
        third, deadline = out / "s2", time.monotonic() + 30
        while not (third.is_dir() and any(".tmp-" in p.name for p in third.iterdir())):
            assert proc.poll() is None, "the saver ended before its third save"
            assert time.monotonic() < deadline, "the third save never began"
            time.sleep(0.0005)
        time.sleep(0.01 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        dirs = sorted(out.iterdir())
        # The kill came during a save: its directory has temporaries, no snapshot.
        assert not (dirs[-1] / "state").exists(), dirs
        assert any(".tmp-" in p.name for p in dirs[-1].iterdir())
        for d in dirs:
            if not (d / "state").exists():
                continue  # the save in progress: nothing under the final names
            # A snapshot under its final names is whole: it restores and runs.
            assert (d / "memory").exists()
            b = restored(d)
            b.console.wait_for(r"COUNTER \d+", timeout=30)
            b.machine.close()


def test_native_run_restores_a_snapshot(
    boot: Callable[..., Booted], test_guest: Path, tmp_path: Path
) -> None:
    g = boot(test_guest, "ready sleep=400 poweroff", memory_mib=32)
    g.console.wait_for("READY")
    g.machine.pause()
    g.machine.save(tmp_path / "snap")
    g.machine.close()
    proc = subprocess.run(
        [sys.executable, "-m", "native.run", "--restore", str(tmp_path / "snap")],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # The guest finishes its sleep and powers off; it never booted again.
    assert proc.returncode == 0, proc.stderr
    assert "SLEPT ms=400" in proc.stdout
    assert "POWEROFF" in proc.stdout
    assert "READY" not in proc.stdout


def test_diff_carries_what_a_disk_wrote_into_guest_memory(
    boot: Callable[..., Booted], restored: Callable[..., Booted], test_guest: Path, tmp_path: Path
) -> None:
    """Pages the virtio device thread writes (read data, used rings) are not in KVM's dirty
    log: the diff must carry them all the same, and the disk works on after the restore."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MIB))  # nothing in guest memory looks like it yet
    console = Console()
    m = native.Machine(
        test_guest,
        cmdline="ready blkinfo sleep=2000 blkread=0,4096 blkwrite=0,8 blkverify=0,8 counter",
        memory_mib=64,
        console_out=console.write_fd,
        disks=[native.Disk(str(disk))],
    )
    try:
        m.start()
        console.wait_for(r"BLK capacity=8192")
        m.pause()
        m.save(tmp_path / "base")
        m.resume()
        console.wait_for(r"BLK read sector=0 count=4096 status=ok")
        console.wait_for(r"BLK verify sector=0 count=8 ok")
        console.wait_for(r"COUNTER 1\b")
        m.pause()
        m.save(tmp_path / "diff", diff=True)
        digest = ram_digest(m)
        before = last_counter(console.drain())
    finally:
        m.close()
        console.close()
    native.merge_snapshot(tmp_path / "base", tmp_path / "diff")
    c2 = Console()
    try:
        new = native.Machine.restore(
            tmp_path / "diff", console_out=c2.write_fd, disks=[native.Disk(str(disk))]
        )
        with new:
            assert ram_digest(new) == digest
            new.start()
            c2.wait_for(rf"COUNTER {before + 2}\b")
    finally:
        c2.close()
    # With the disk in another state (another size) the snapshot is refused.
    disk.write_bytes(b"\0" * (2 * MIB))
    with pytest.raises(native.SnapshotError, match="sectors"):
        native.Machine.restore(tmp_path / "diff", disks=[native.Disk(str(disk))])


# ---- live saves: written while the guest runs, paused only for the last pass ----


def test_a_live_save_of_a_guest_rewriting_memory_is_the_machine_at_its_pause(
    boot: Callable[..., Booted], restored: Callable[..., Booted], test_guest: Path, tmp_path: Path
) -> None:
    """The guest rewrites 8 MiB without end, so every pass finds pages the one before wrote
    stale: what restores must still be RAM exactly as it was when the save paused."""
    g = boot(test_guest, "ready memtest=16 rewrite=8", vcpus=2, memory_mib=128)
    g.console.wait_for("REWRITE pass=1 done")
    full = g.machine.save(tmp_path / "full", live=True, keep_paused=True)
    assert g.machine.state() is native.MachineState.PAUSED
    digest = ram_digest(g.machine)
    # Passes ran while the guest wrote, and the pause wrote only what the last one left
    # (how much depends on how much CPU the guest got), not the 16 + 8 MiB the guest holds.
    assert full.passes >= 1, full
    assert full.memory_pages >= (16 + 8) * 256, full
    assert full.pages_paused < (16 + 8) * 256 // 2, full
    assert full.paused_ms < full.memory_ms, full
    new = restored(tmp_path / "full", start=False)
    assert ram_digest(new.machine) == digest

    # A live diff on top, of the same running guest: merged, it is the machine at its pause.
    # It has run since: a COUNTER line after the last one before the pause (an earlier
    # line matched at once, and a diff taken before the guest ran had nothing in it).
    last = max(int(n) for n in re.findall(r"COUNTER (\d+)", g.console.text))
    g.machine.resume()
    g.console.wait_for(rf"COUNTER {last + 1}\b")
    diff = g.machine.save(tmp_path / "diff", diff=True, live=True, keep_paused=True)
    digest = ram_digest(g.machine)
    assert (
        native.snapshot_info(tmp_path / "diff").parent == native.snapshot_info(tmp_path / "full").id
    )
    assert 0 < diff.memory_pages < full.memory_pages, diff  # what the guest rewrote since
    native.merge_snapshot(tmp_path / "full", tmp_path / "diff")
    again = restored(tmp_path / "diff", start=False)
    assert ram_digest(again.machine) == digest
    again.machine.start()
    again.console.wait_for(r"COUNTER \d+")  # the rewriting goes on where it was


def test_a_live_save_leaves_the_guest_running_and_its_restore_counts_on(
    boot: Callable[..., Booted], restored: Callable[..., Booted], test_guest: Path, tmp_path: Path
) -> None:
    g = boot(test_guest, "ready memtest=16 counter=2", vcpus=2, memory_mib=128)
    g.console.wait_for(r"COUNTER 2\b")
    stats = g.machine.save(tmp_path / "snap", live=True)
    assert g.machine.state() is native.MachineState.RUNNING
    assert stats.passes >= 1
    assert stats.paused_ms <= stats.state_ms + stats.memory_ms
    at = last_counter(g.console.drain())
    g.console.wait_for(rf"COUNTER {at + 2}\b")  # it never stopped counting
    new = restored(tmp_path / "snap")
    new.console.wait_for(r"MEMCHECK n=\d+ ok")  # the memtest region came back whole
    assert "READY" not in new.console.text
    # A live diff right after: the base is the live snapshot.
    g.machine.save(tmp_path / "diff", diff=True, live=True)
    assert (
        native.snapshot_info(tmp_path / "diff").parent == native.snapshot_info(tmp_path / "snap").id
    )
    # Live on a paused machine is the plain save.
    g.machine.pause()
    paused = g.machine.save(tmp_path / "paused", live=True)
    assert paused.passes == 0
    assert g.machine.state() is native.MachineState.PAUSED


def test_a_live_save_that_runs_out_of_space_leaves_the_guest_running_and_no_snapshot(
    boot: Callable[..., Booted], test_guest: Path, small_fs: Path
) -> None:
    g = boot(test_guest, "ready memtest=16 counter", vcpus=1, memory_mib=64)
    g.console.wait_for(r"COUNTER 1\b")
    with pytest.raises(native.VmmError, match="No space left"):
        g.machine.save(small_fs / "snap", live=True)
    assert g.machine.state() is native.MachineState.RUNNING
    at = last_counter(g.console.drain())
    g.console.wait_for(rf"COUNTER {at + 1}\b")
    assert [p.name for p in (small_fs / "snap").iterdir()] == []  # no temporary left
    # It has no base for a diff (the first snapshot failed)...
    with pytest.raises(native.MachineStateError, match="diff against"):
        g.machine.save(small_fs / "diff", diff=True, live=True)
