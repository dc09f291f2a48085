"""Hosts with enough vCPUs left: capacity x cpu_allocation_ratio - usage - claims in flight."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class CpuFilter(Filter):
    name = "vcpus"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        return host.free_vcpus >= request.vcpus
