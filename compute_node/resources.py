"""Capacity and claims: a domain in an active state holds its vCPUs and RAM; a start that would
exceed capacity * allocation ratio (minus the host's reserve) is refused with `no_capacity`."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from protos.domain import ACTIVE_STATES, DomainSpec
from protos.host import HostInventory, Resources
from services.bus import ServiceError


class Claims:
    """Resources held by domains that have (or are getting) a machine on this host."""

    def __init__(self, inventory: HostInventory, reserved_memory_mib: int) -> None:
        self.inventory = inventory
        self.reserved_memory_mib = reserved_memory_mib
        self._held: dict[uuid.UUID, Resources] = {}
        # Counts every change of what is held, from a start value past any earlier process's
        # (microseconds at start-up), so it only grows across restarts. A heartbeat carries
        # the count its usage was read at, and a reply the count at which the domain's claim
        # was taken: the scheduler drops its own claim exactly when a beat counts the domain.
        self._seq = time.time_ns() // 1000
        self._claimed_at: dict[uuid.UUID, int] = {}
        self._lock = threading.Lock()
        # Called after a release (a heartbeat now: the schedulers count the room freed
        # before the event that frees it reaches them, not an interval later).
        self.released: Callable[[], None] = lambda: None

    def limits(self) -> Resources:
        cap = self.inventory.capacity
        return Resources(
            vcpus=int(cap.vcpus * self.inventory.cpu_allocation_ratio),
            memory_mib=max(
                0,
                int(
                    (cap.memory_mib - self.reserved_memory_mib)
                    * self.inventory.ram_allocation_ratio
                ),
            ),
        )

    def usage(self) -> Resources:
        return self.usage_at()[0]

    def usage_at(self) -> tuple[Resources, int]:
        """What is held, and the change count it was read at (both read together)."""
        with self._lock:
            held = list(self._held.values())
            seq = self._seq
        return Resources(
            vcpus=sum(r.vcpus for r in held), memory_mib=sum(r.memory_mib for r in held)
        ), seq

    def claimed_at(self, domain_id: uuid.UUID) -> int | None:
        """The change count at which `domain_id`'s resources were taken; None if not held."""
        with self._lock:
            return self._claimed_at.get(domain_id)

    def _took(self, domain_id: uuid.UUID, resources: Resources) -> None:
        self._seq += 1
        self._held[domain_id] = resources
        self._claimed_at[domain_id] = self._seq

    def claim(self, spec: DomainSpec) -> None:
        """Hold `spec`'s resources, or raise ServiceError(no_capacity) saying what is short."""
        want = Resources(vcpus=spec.vcpus, memory_mib=spec.memory_mib)
        limits = self.limits()
        with self._lock:
            if spec.uuid in self._held:
                return
            used_vcpus = sum(r.vcpus for r in self._held.values())
            used_mib = sum(r.memory_mib for r in self._held.values())
            short = []
            if used_vcpus + want.vcpus > limits.vcpus:
                short.append(f"vCPUs: {want.vcpus} wanted, {limits.vcpus - used_vcpus} free")
            if used_mib + want.memory_mib > limits.memory_mib:
                short.append(
                    f"memory: {want.memory_mib} MiB wanted, {limits.memory_mib - used_mib} free"
                )
            if short:
                raise ServiceError(
                    "no_capacity",
                    "host has no room: " + "; ".join(short),
                    {
                        "requested": want.model_dump(),
                        "free": {
                            "vcpus": limits.vcpus - used_vcpus,
                            "memory_mib": limits.memory_mib - used_mib,
                        },
                    },
                )
            self._took(spec.uuid, want)

    def hold(self, spec: DomainSpec) -> None:
        """Record resources already in use (adopted machines), even beyond the limits."""
        with self._lock:
            if spec.uuid not in self._held:
                self._took(spec.uuid, Resources(vcpus=spec.vcpus, memory_mib=spec.memory_mib))

    def release(self, domain_id: uuid.UUID) -> None:
        with self._lock:
            if self._held.pop(domain_id, None) is None:
                return
            self._seq += 1
            self._claimed_at.pop(domain_id, None)
        self.released()

    def holds(self, domain_id: uuid.UUID) -> bool:
        with self._lock:
            return domain_id in self._held


__all__ = ["ACTIVE_STATES", "Claims"]
