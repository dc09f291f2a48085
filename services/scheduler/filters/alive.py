"""Hosts that are enabled and not down: heard from within `down_after_intervals` of their
interval, by the replica's clock or by the stream of heartbeats (`Hearing.host_down`)."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import Hearing, HostState, PlacementRequest


class AliveFilter(Filter):
    name = "alive"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        hearing = request.hearing or Hearing(request.now)
        config = self.config
        down = hearing.host_down(host, config.down_after_intervals, config.silence_grace_intervals)
        return host.enabled and not down
