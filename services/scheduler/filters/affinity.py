"""Server groups: anti-affinity keeps a group's members on distinct hosts, affinity on the host
(or hosts) its members already use; the first member of a group may go anywhere."""

from __future__ import annotations

from protos.domain import PlacementPolicy
from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class GroupPolicyFilter(Filter):
    name = "group_policy"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        if request.group is None:
            return True
        if request.policy is PlacementPolicy.ANTI_AFFINITY:
            return host.name not in request.group_hosts
        return not request.group_hosts or host.name in request.group_hosts
