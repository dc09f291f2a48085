"""Hosts that answer: one that beats on but left a define or start unanswered (its worker
stuck behind a live heartbeat thread) is passed by for `unanswered_retry_s`, unless it
answers a command or restarts first (services.scheduler.state.HostState.unanswered_at)."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class ResponsiveFilter(Filter):
    name = "responsive"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        since = host.unanswered_at
        return since is None or request.now - since >= self.config.unanswered_retry_s
