"""The weigher contract: one method scoring a host that passed the filters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from services.scheduler.state import HostState, PlacementRequest


class Weigher(ABC):
    """`weigh` returns a raw score; the placer scales each weigher's scores to 0..1 across the
    candidates, multiplies by `multiplier` and sums, so multipliers compare weighers fairly and a
    negative multiplier inverts a preference (spread vs pack)."""

    name: ClassVar[str]

    def __init__(self, multiplier: float) -> None:
        self.multiplier = multiplier

    @abstractmethod
    def weigh(self, host: HostState, request: PlacementRequest) -> float: ...
