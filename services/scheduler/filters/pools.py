"""Host-local pools: a domain moving with volumes on `dir` pools (a migration) needs a target
with a pool of each of those names, where the storage service puts the volumes' copies. A host
whose heartbeat does not list its pools (an older node) is not removed: the storage service's
`prepare` still refuses it if it lacks one."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class PoolsFilter(Filter):
    name = "pools"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        if not request.pools:
            return True
        pools = host.inventory.pools
        return pools is None or request.pools.issubset(pools)
