"""The kernel image parser of the native loader (no KVM needed): what it accepts, and the
clear errors with which it refuses malformed images."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native
from native import ConfigError, ImageKind, parse_image
from tests.kvm.tinyguest import LOAD_ADDR, build_pvh_elf, code_print_and_exit

CODE = code_print_and_exit(b"hi", 0)


def elf64(entry: int = 0x1000000, paddr: int = 0x1000000, size: int = 0x200) -> bytes:
    """A minimal ELF64 executable with one PT_LOAD and no notes (a vmlinux)."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, paddr, paddr, size, size, 0x1000)
    return ehdr + phdr + bytes(size)


def bzimage(
    version: int = 0x20F,
    xloadflags: int = 1,
    loadflags: int = 1,
    payload: int = 0x3000,
    init_size: int = 0x800000,
) -> bytes:
    setup_sects = 4
    img = bytearray((setup_sects + 1) * 512 + payload)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x66  # header ends at 0x268
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = loadflags
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<I", img, 0x260, init_size)
    return bytes(img)


def test_pvh_elf_is_recognized_with_its_entry() -> None:
    info = parse_image(build_pvh_elf(CODE, entry_offset=2))
    assert info.kind is ImageKind.PVH
    assert info.entry == LOAD_ADDR + 2
    assert (info.load_start, info.load_end) == (LOAD_ADDR, LOAD_ADDR + len(CODE))
    assert info.nsegments == 1


def test_elf64_without_note_is_a_vmlinux() -> None:
    info = parse_image(elf64())
    assert info.kind is ImageKind.VMLINUX
    assert info.entry == 0x1000000


def test_bzimage_header_fields() -> None:
    info = parse_image(bzimage())
    assert info.kind is ImageKind.BZIMAGE
    assert info.setup_version == 0x20F
    assert info.entry == 0x100200
    assert info.load_start == 0x100000
    assert info.load_end == 0x100000 + 0x800000  # init_size exceeds the payload
    assert info.cmdline_size == 2047


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (b"", "not a kernel image"),
        (b"MZ" + bytes(1000), "not a kernel image"),
        (build_pvh_elf(CODE, with_note=False), "PVH entry note"),
        (b"\x7fELF", "truncated"),
        (b"\x7fELF\x02\x01", "truncated"),
        (build_pvh_elf(CODE)[:40], "truncated"),
        (build_pvh_elf(CODE)[:70], "past the end"),
        (build_pvh_elf(CODE, entry_offset=0x10000), "outside the loaded segments"),
        (elf64(paddr=0x8000), "below 1 MiB"),
        (elf64(paddr=0xFFFFF000), "beyond low RAM"),
        (elf64()[:200], "past the end of the file"),
        (elf64()[:5] + b"\x02" + elf64()[6:], "little-endian"),
        (elf64()[:18] + b"\x28\x00" + elf64()[20:], "not x86"),
        (bzimage(version=0x208), "too old"),
        (bzimage(xloadflags=0), "no 64-bit entry"),
        (bzimage(loadflags=0), "not loaded high"),
        (bzimage(payload=0), "no kernel after"),
        (bzimage()[:0x240], "truncated"),
    ],
)
def test_malformed_images_are_refused_with_a_reason(image: bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_image(image)


def test_errors_are_config_errors_and_value_errors() -> None:
    with pytest.raises(ValueError, match="not a kernel image") as info:
        parse_image(b"junk")
    assert isinstance(info.value, native.VmmError)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_images_never_crash_the_parser(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([build_pvh_elf(CODE), elf64(), bzimage(payload=64)]))
    image = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(image)))
    try:
        info = parse_image(bytes(image[:cut]))
    except ConfigError:
        return
    assert info.load_start <= info.entry < info.load_end or info.kind is ImageKind.BZIMAGE
