"""Hosts with enough memory left: capacity x ram_allocation_ratio - usage - claims in flight."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class RamFilter(Filter):
    name = "memory"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        return host.free_memory_mib >= request.memory_mib
