"""What the scheduler service's parts share: the service's config, cluster state, placer and
replica name, and the seams they call through (`call` to a compute node or the network
service, `_announce` a claim to the peers), which the service (services.scheduler.service)
and its claims (services.scheduler.claims) provide."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from protos.base import Message
from protos.commands import Command
from protos.scheduler import ClaimPhase
from services.bus import Bus
from services.scheduler.catch_up import CatchUp
from services.scheduler.config import SchedulerConfig
from services.scheduler.placer import Placer
from services.scheduler.state import Claim, ClusterState


class SchedulerCore:
    """The attributes and seams each part of the scheduler service relies on."""

    config: SchedulerConfig
    state: ClusterState
    placer: Placer
    replica: str
    bus: Bus | None
    sync: CatchUp | None

    if TYPE_CHECKING:

        def call(
            self,
            queue: str,
            command: Command,
            *,
            timeout: float,
            message_id: str | None,
            expires: bool = False,
        ) -> Message: ...

        def _announce(self, phase: ClaimPhase, claim: Claim) -> None: ...

        def _bind_ports(self, domain_id: uuid.UUID, host: str, request_id: str) -> None: ...
