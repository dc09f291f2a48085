"""The one output format of every benchmark: a JSON object per figure, one per line, last.

{"metric": "boot.start_to_exit", "value": 41.2, "unit": "ms", "anchor": "qemu-microvm",
 "anchor_value": 104.0, "ratio": 0.396, "target": "ratio <= 0.5"}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable


def say(text: str) -> None:
    """A human-readable line of a benchmark's progress or results (stderr: stdout is the
    figures')."""
    print(text, file=sys.stderr, flush=True)


def figure(
    metric: str,
    value: float,
    unit: str,
    *,
    anchor: str,
    anchor_value: float,
    target: str,
    **extra: object,
) -> dict[str, object]:
    """One figure; `ratio` is value / anchor_value. `extra` fields follow the standard ones."""
    return {
        "metric": metric,
        "value": round(value, 3),
        "unit": unit,
        "anchor": anchor,
        "anchor_value": round(anchor_value, 3),
        "ratio": round(value / anchor_value, 4),
        "target": target,
        **extra,
    }


def emit(figures: Iterable[dict[str, object]]) -> None:
    for f in figures:
        print(json.dumps(f))
