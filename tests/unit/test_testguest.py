"""Building the test guest (native/guest/) and the shape of the ELF it produces: a PVH
entry note and loadable segments that the VMM and QEMU both accept (no KVM needed)."""

from __future__ import annotations

import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from native import testguest

PT_LOAD = 1
PT_NOTE = 4
PF_X = 1
XEN_ELFNOTE_PHYS32_ENTRY = 18

needs_toolchain = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("gcc", "ld", "make")),
    reason="gcc, ld or make missing",
)


@dataclass(frozen=True)
class Segment:
    type: int
    flags: int
    offset: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def segments(elf: bytes) -> list[Segment]:
    assert elf[:4] == b"\x7fELF"
    assert elf[4] == 2, "ELF64"
    assert elf[5] == 1, "little endian"
    (machine,) = struct.unpack_from("<H", elf, 18)
    assert machine == 62, "x86-64"
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", elf, 32)[0],
        *struct.unpack_from("<HH", elf, 54),
    )
    out = []
    for i in range(phnum):
        p_type, flags, offset, _vaddr, paddr, filesz, memsz, align = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize
        )
        out.append(Segment(p_type, flags, offset, paddr, filesz, memsz, align))
    return out


def pvh_entries(elf: bytes) -> list[int]:
    """Entries named by Xen PHYS32_ENTRY notes, read the way QEMU reads them: the
    descriptor follows the name aligned to the PT_NOTE segment's p_align."""
    found = []
    for seg in segments(elf):
        if seg.type != PT_NOTE:
            continue
        pos, end = seg.offset, seg.offset + seg.filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            desc_at = pos + 12 + (namesz + seg.align - 1) // seg.align * seg.align
            if ntype == XEN_ELFNOTE_PHYS32_ENTRY and name == b"Xen\0":
                assert descsz >= 4
                found.append(struct.unpack_from("<Q" if descsz >= 8 else "<I", elf, desc_at)[0])
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return found


@pytest.fixture(scope="module")
def guest_elf() -> bytes:
    return testguest.build().read_bytes()


@needs_toolchain
def test_build_returns_the_elf_and_is_stable(guest_elf: bytes) -> None:
    path = testguest.build()
    assert path == testguest.OUTPUT
    assert path.read_bytes() == guest_elf


@needs_toolchain
def test_pvh_note_names_an_entry_in_executable_code(guest_elf: bytes) -> None:
    entries = pvh_entries(guest_elf)
    assert len(entries) == 1
    entry = entries[0]
    assert entry < 1 << 32, "the PVH entry is 32-bit"
    loads = [s for s in segments(guest_elf) if s.type == PT_LOAD]
    assert any(s.flags & PF_X and s.paddr <= entry < s.paddr + s.filesz for s in loads)


@needs_toolchain
def test_loadable_segments_sit_above_1mib_and_below_4gib(guest_elf: bytes) -> None:
    loads = [s for s in segments(guest_elf) if s.type == PT_LOAD]
    assert loads
    for seg in loads:
        assert seg.paddr >= 0x100000
        assert seg.paddr + seg.memsz < 1 << 32
        assert seg.filesz <= seg.memsz
        assert seg.offset + seg.filesz <= len(guest_elf)


@needs_toolchain
def test_concurrent_builds_leave_one_complete_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest_elf: bytes
) -> None:
    out = tmp_path / "build" / "guest.elf"
    monkeypatch.setattr(testguest, "OUTPUT", out)
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(testguest.build())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [out, out]
    assert pvh_entries(out.read_bytes()) == pvh_entries(guest_elf)
    assert [p.name for p in out.parent.iterdir()] == ["guest.elf"], "no temp dirs left"


def test_missing_tools_raise_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testguest, "OUTPUT", tmp_path / "guest.elf")
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(testguest.GuestBuildError, match="gcc"):
        testguest.build()
