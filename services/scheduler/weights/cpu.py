"""Free vCPUs, with the same sign convention as the RAM weigher (off unless its multiplier is
set: memory is what runs out first on most clouds)."""

from __future__ import annotations

from services.scheduler.state import HostState, PlacementRequest
from services.scheduler.weights.base import Weigher


class CpuWeigher(Weigher):
    name = "cpu"

    def weigh(self, host: HostState, _request: PlacementRequest) -> float:
        return host.free_vcpus
