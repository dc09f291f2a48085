"""Host filters, registered here explicitly and run in this order (cheap and most selective
first). `SchedulerConfig.filters` may name a subset."""

from __future__ import annotations

from services.scheduler.config import SchedulerConfig
from services.scheduler.filters.affinity import GroupPolicyFilter
from services.scheduler.filters.alive import AliveFilter
from services.scheduler.filters.base import Filter
from services.scheduler.filters.cpu import CpuFilter
from services.scheduler.filters.forced_host import ForcedHostFilter
from services.scheduler.filters.max_vcpus import MaxVcpusFilter
from services.scheduler.filters.pools import PoolsFilter
from services.scheduler.filters.ram import RamFilter
from services.scheduler.filters.responsive import ResponsiveFilter
from services.scheduler.filters.volume_locality import VolumeLocalityFilter

REGISTERED: tuple[type[Filter], ...] = (
    ForcedHostFilter,
    VolumeLocalityFilter,
    PoolsFilter,
    AliveFilter,
    ResponsiveFilter,
    MaxVcpusFilter,
    CpuFilter,
    RamFilter,
    GroupPolicyFilter,
)


def build_filters(config: SchedulerConfig) -> list[Filter]:
    """The filters `config` enables, in registration order; an unknown name is a ValueError."""
    by_name = {cls.name: cls for cls in REGISTERED}
    wanted = config.filters if config.filters is not None else tuple(by_name)
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise ValueError(f"unknown filters {unknown}; registered: {sorted(by_name)}")
    return [cls(config) for cls in REGISTERED if cls.name in wanted]


__all__ = [
    "REGISTERED",
    "AliveFilter",
    "CpuFilter",
    "Filter",
    "ForcedHostFilter",
    "GroupPolicyFilter",
    "MaxVcpusFilter",
    "PoolsFilter",
    "RamFilter",
    "ResponsiveFilter",
    "VolumeLocalityFilter",
    "build_filters",
]
