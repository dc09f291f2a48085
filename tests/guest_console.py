"""Reading the test guest's console (docs/machine.md, "The test guest") where a test sees
only its tail: the COUNTER values and the MEMCHECK lines of `counter=K` after a given
counter value."""

from __future__ import annotations

import re
from dataclasses import dataclass

MEMTEST = re.compile(r"MEMTEST mib=\d+ base=0x[0-9a-f]+ checksum=0x([0-9a-f]{16})")
LINE = re.compile(r"(?:COUNTER (\d+)|MEMCHECK n=\d+ (.*?))\r?\n")


@dataclass
class Since:
    """What the guest printed after COUNTER `last`: the counter values and the MEMCHECK
    lines (their text after `n=<i> `), in order."""

    counters: list[int]
    checks: list[str]

    def consecutive(self) -> bool:
        """The counter went on one by one: no restart, no jump."""
        first = self.counters[0] if self.counters else 0
        return self.counters == list(range(first, first + len(self.counters)))


def counters(text: str) -> list[int]:
    return [int(m[1]) for m in LINE.finditer(text) if m[1] is not None]


def since(text: str, last: int) -> Since:
    """The lines after the first COUNTER above `last` began (that one included)."""
    out = Since([], [])
    for m in LINE.finditer(text):
        if m[1] is not None:
            if out.counters or int(m[1]) > last:
                out.counters.append(int(m[1]))
        elif out.counters:
            out.checks.append(m[2])
    return out
