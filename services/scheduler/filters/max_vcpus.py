"""Hosts whose hypervisor runs a domain of this many vCPUs (`max_vcpus_per_domain`)."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class MaxVcpusFilter(Filter):
    name = "max_vcpus"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        return request.vcpus <= host.inventory.max_vcpus_per_domain
