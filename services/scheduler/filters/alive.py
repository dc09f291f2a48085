"""Hosts that sent a heartbeat recently (within `down_after_intervals` of their interval) and
are enabled."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class AliveFilter(Filter):
    name = "alive"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        silent = request.now - host.seen_at
        return host.enabled and silent <= self.config.down_after_intervals * host.interval_s
