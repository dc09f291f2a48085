"""Placement: host state from heartbeats, filters, weighers, claims and retries."""

from services.scheduler.config import SchedulerConfig
from services.scheduler.placer import Decision, NoValidHost, Placer
from services.scheduler.service import Scheduler, SchedulerService
from services.scheduler.state import Claim, ClusterState, HostState, PlacementRequest

__all__ = [
    "Claim",
    "ClusterState",
    "Decision",
    "HostState",
    "NoValidHost",
    "PlacementRequest",
    "Placer",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerService",
]
