"""Which image format a file holds, from its first bytes, without letting qemu-img guess.

qemu-img's own probing opens whatever the header names: a VMDK descriptor can name host
files as its extents, so `qemu-img info` of a tenant's upload would open them. The format is
therefore decided here, from magic numbers (those qemu's block drivers probe for), and
qemu-img only ever runs with an explicit `-f`. A file that is none of them is raw.
"""

from __future__ import annotations

import os

HEADER_BYTES = 512

# (offset, magic, format); qemu's block/*.c probe functions look for these.
MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow"),
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
)


def sniff(fd: int) -> str:
    """The format of the file open at `fd` ("qcow2", "raw", or another format's name)."""
    head = os.pread(fd, HEADER_BYTES, 0)
    for offset, magic, name in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return "raw"
