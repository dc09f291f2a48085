"""`placement.host` in the spec: only that host is considered (the other filters still apply,
so a forced host without room is a `no_valid_host`, not an over-commit)."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class ForcedHostFilter(Filter):
    name = "forced_host"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        return request.forced_host is None or host.name == request.forced_host
