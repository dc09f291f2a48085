"""Volume locality: a disk on a host-local (`dir`) pool, or an image in one, can be used only on
that pool's host (the compute node opens the file from its own pools), so a request whose
bindings name a host goes there. Bindings naming two different hosts can be met nowhere: every
host is removed and the `no_valid_host` answer names this filter. Bindings on `shared` pools
name no host and restrict nothing."""

from __future__ import annotations

from services.scheduler.filters.base import Filter
from services.scheduler.state import HostState, PlacementRequest


class VolumeLocalityFilter(Filter):
    name = "volume_locality"

    def host_passes(self, host: HostState, request: PlacementRequest) -> bool:
        return not request.volume_hosts or request.volume_hosts == {host.name}
