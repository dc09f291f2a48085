"""The test guest's `initrd` action: what it prints for the module the VMM loaded, so a
test can tell that the guest received exactly the initrd it was given."""

from __future__ import annotations

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1


def fnv1a(data: bytes) -> int:
    """FNV-1a 64, as native/guest/actions.c computes it over the module's bytes."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK
    return h


def initrd_line(data: bytes) -> str:
    """The pattern of the guest's `INITRD` line for a module holding `data`."""
    return rf"INITRD addr=0x[0-9a-f]+ size={len(data)} fnv1a=0x{fnv1a(data):016x}"
