"""`host.heartbeat.<host>` every few seconds: inventory, usage, domains by state, KVM kind."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog

from compute_node.resources import Claims
from compute_node.store import Store
from protos.host import HostHeartbeat, HostInventory
from services.bus import Bus
from services.version import package_version

log = structlog.get_logger("flotilla.compute.heartbeat")


class Heartbeat:
    def __init__(
        self,
        *,
        bus: Bus,
        host: str,
        inventory: HostInventory,
        claims: Claims,
        store: Store,
        interval_s: float,
    ) -> None:
        self._bus = bus
        self._host = host
        self._inventory = inventory
        self._claims = claims
        self._store = store
        self._interval = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        # Whether the host takes new guests, and the SetHostEnabled generation that said so.
        self.host_switch: Callable[[], tuple[bool, int]] = lambda: (True, 0)
        # Inventory fields known only at run time (the VXLAN address, network warnings).
        self.inventory_extra: Callable[[], dict[str, Any]] = dict

    def beat(self) -> HostHeartbeat:
        by_state = self._store.count_by_state()
        enabled, generation = self.host_switch()
        usage, claims_seq = self._claims.usage_at()
        return HostHeartbeat(
            host=self._host,
            version=package_version(),
            interval_s=self._interval,
            enabled=enabled,
            enabled_generation=generation,
            inventory=self._inventory.model_copy(update=self.inventory_extra()),
            usage=usage,
            claims_seq=claims_seq,
            domains_by_state=by_state,
        )

    def send_now(self) -> None:
        """A heartbeat now: the regular ones, and one between them (room released, the
        host's switch turned) published before the caller goes on, so what it says reaches
        the schedulers first. Not waited for: one lost in a reconnect is replaced by the
        next."""
        try:
            if self._bus.link.connected:
                self._bus.publish_event_async(self.beat())
        except Exception:
            log.exception("heartbeat failed")

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.send_now()
            self._stopping.wait(self._interval)
