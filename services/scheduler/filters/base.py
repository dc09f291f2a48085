"""The filter contract: one method that says whether a host can take a request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from services.scheduler.config import SchedulerConfig
from services.scheduler.state import HostState, PlacementRequest


class Filter(ABC):
    """Removes hosts that cannot take a request. `name` is how `no_valid_host` reports the
    hosts it removed. `host_passes` runs under the scheduler's state lock, once per host per
    decision: it must be cheap and must not block."""

    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abstractmethod
    def host_passes(self, host: HostState, request: PlacementRequest) -> bool: ...
