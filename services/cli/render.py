"""Output: aligned tables for people, JSON for scripts, progress on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, like virsh list; `-` for empty cells."""
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    out = [f" {line}", "-" * (len(line) + 2)]
    out += [
        " " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(out)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`Name:   value` lines, like virsh dominfo."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {'-' if v in (None, '') else v}" for k, v in pairs)


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per change off one."""

    def __init__(self, what: str, *, quiet: bool = False) -> None:
        self.what = what
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = ""

    def update(self, status: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.started
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{self.what}: {status} ({elapsed:.1f} s)")
            sys.stderr.flush()
        elif status != self.last:
            sys.stderr.write(f"{self.what}: {status} ({elapsed:.1f} s)\n")
        self.last = status

    def done(self, status: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.started
        prefix = "\r\x1b[K" if self.tty else ""
        sys.stderr.write(f"{prefix}{self.what}: {status} ({elapsed:.1f} s)\n")
        sys.stderr.flush()
