"""Free memory: a positive multiplier spreads guests (most free RAM first), a negative one
packs them (least free RAM first, keeping whole hosts empty)."""

from __future__ import annotations

from services.scheduler.state import HostState, PlacementRequest
from services.scheduler.weights.base import Weigher


class RamWeigher(Weigher):
    name = "ram"

    def weigh(self, host: HostState, _request: PlacementRequest) -> float:
        return host.free_memory_mib
