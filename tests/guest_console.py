"""Reading the test guest's console (docs/machine.md, "The test guest") where a test sees
only its tail: the COUNTER values and the MEMCHECK lines of `counter=K` after a given
counter value."""

from __future__ import annotations

import re
from dataclasses import dataclass

MEMTEST = re.compile(r"MEMTEST mib=\d+ base=0x[0-9a-f]+ checksum=0x([0-9a-f]{16})")
LINE = re.compile(r"(?:COUNTER (\d+)|MEMCHECK n=\d+ (.*?)|(READY) .*?)\r?\n")


@dataclass
class Since:
    """What the guest printed after COUNTER `last`: the counter values, the MEMCHECK lines
    (their text after `n=<i> `), in order, and how many times it booted (READY)."""

    counters: list[int]
    checks: list[str]
    boots: int = 0

    def consecutive(self) -> bool:
        """The counter went on one by one: no restart, no jump."""
        first = self.counters[0] if self.counters else 0
        return self.counters == list(range(first, first + len(self.counters)))


def counters(text: str) -> list[int]:
    return [int(m[1]) for m in LINE.finditer(text) if m[1] is not None]


def since(text: str, last: int) -> Since:
    """The lines after the last COUNTER `last` line, or where the tail no longer holds it,
    from the first COUNTER above `last` on."""
    mark = f"COUNTER {last}\n"
    at = text.rfind(mark)
    started = at >= 0
    out = Since([], [])
    for m in LINE.finditer(text, at + len(mark) if started else 0):
        if m[1] is not None:
            if started or int(m[1]) > last:
                started = True
                out.counters.append(int(m[1]))
        elif not started:
            continue
        elif m[3] is not None:
            out.boots += 1
        else:
            out.checks.append(m[2])
    return out
