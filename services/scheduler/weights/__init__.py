"""Host weighers, registered here explicitly. `SchedulerConfig.weigher` says spread (positive
multipliers) or pack (negative); a weigher whose multiplier is 0 is left out."""

from __future__ import annotations

from services.scheduler.config import SchedulerConfig
from services.scheduler.weights.base import Weigher
from services.scheduler.weights.cpu import CpuWeigher
from services.scheduler.weights.ram import RamWeigher


def build_weighers(config: SchedulerConfig) -> list[Weigher]:
    sign = 1.0 if config.weigher == "spread" else -1.0
    made: list[Weigher] = [
        RamWeigher(sign * config.ram_weight_multiplier),
        CpuWeigher(sign * config.cpu_weight_multiplier),
    ]
    return [w for w in made if w.multiplier != 0]


__all__ = ["CpuWeigher", "RamWeigher", "Weigher", "build_weighers"]
