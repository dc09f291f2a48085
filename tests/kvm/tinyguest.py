"""A hand-made PVH guest of a few bytes of 32-bit code, independent of native/guest/.

It prints a line on COM1 and writes a value to the debug-exit port, so the VMM's boot path
and exit events can be tested without a toolchain.
"""

from __future__ import annotations

import struct
from pathlib import Path

LOAD_ADDR = 0x100000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def code_print_and_exit(text: bytes, exit_value: int) -> bytes:
    """mov dx, 0x3f8; (mov al, c; out dx, al)*; mov al, v; out 0xf4, al; hlt; jmp $-1."""
    code = b"\x66\xba\xf8\x03"
    for c in text:
        code += bytes([0xB0, c, 0xEE])
    code += bytes([0xB0, exit_value & 0xFF, 0xE6, 0xF4])
    code += b"\xf4\xeb\xfd"
    return code


def build_pvh_elf(code: bytes, *, with_note: bool = True, entry_offset: int = 0) -> bytes:
    """An ELF32 with one PT_LOAD at 1 MiB holding `code` and a PVH entry note."""
    ehdr_size, phdr_size = 52, 32
    nphdr = 2 if with_note else 1
    note = struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
    note += struct.pack("<I", LOAD_ADDR + entry_offset)
    code_off = ehdr_size + phdr_size * nphdr
    note_off = code_off + len(code)
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIIIIIHHHHHH",
        2,
        3,
        1,
        LOAD_ADDR + entry_offset,
        ehdr_size,
        0,
        0,
        ehdr_size,
        phdr_size,
        nphdr,
        40,
        0,
        0,
    )
    load = struct.pack("<IIIIIIII", 1, code_off, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 7, 16)
    phdrs = load
    if with_note:
        phdrs += struct.pack("<IIIIIIII", 4, note_off, 0, 0, len(note), len(note), 4, 4)
    body = ehdr + phdrs + code
    if with_note:
        body += note
    return body


def write_tiny_guest(path: Path, text: bytes = b"tiny ok\n", exit_value: int = 0x21) -> Path:
    path.write_bytes(build_pvh_elf(code_print_and_exit(text, exit_value)))
    return path
