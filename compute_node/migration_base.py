"""What both ends of a migration between compute nodes use (compute_node.migration_source,
compute_node.migration_target; put together in compute_node.migrating): the parts of the
lifecycle service they are mixed into, the call to another node or service over the bus, and
letting go of a domain's definition on this host."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

import structlog

from compute_node.boot_sources import BootFiles, BootSources
from compute_node.causes import PendingCauses
from compute_node.driver import Driver, DriverError, GuestEvent, NicTap
from compute_node.networks import HostNetworks
from compute_node.resources import Claims
from compute_node.storage_sources import StorageSources
from compute_node.storage_steps import PendingSteps
from compute_node.store import DomainRecord, Store
from protos.base import Message
from protos.commands import Command, DefineDomain
from protos.replies import DomainInfo
from protos.states import Action

log = structlog.get_logger("flotilla.compute")

PEER_TIMEOUT_S = 30.0
T = TypeVar("T")


class PeerCall(Protocol):
    """Another node or service, over the bus (Bus.call): its reply, or RemoteError, or
    another BusError when none came."""

    def __call__(
        self, queue: str, command: Command, timeout: float, message_id: str | None = None
    ) -> Message: ...


class MigrationBase:
    """The lifecycle service provides the annotated parts; `_init_peers` sets the rest."""

    host: str
    store: Store
    driver: Driver
    claims: Claims
    sources: BootSources
    storage: StorageSources
    causes: PendingCauses
    networks: HostNetworks | None
    info: Callable[[uuid.UUID], DomainInfo]
    _lock: Callable[[uuid.UUID], threading.Lock]
    _record: Callable[[uuid.UUID], DomainRecord]
    _check: Callable[[DomainRecord, Action], bool]
    _check_ports: Callable[[DefineDomain], None]
    _plug: Callable[[DomainRecord], tuple[list[NicTap], Future[object]]]
    _network_call: Callable[[Callable[[], object]], None]
    _consume: Callable[[GuestEvent], None]
    on_guest_event: Callable[[GuestEvent], None]

    def _run_plumbed(
        self,
        record: DomainRecord,
        launch: Callable[[BootFiles, list[NicTap]], T],
        *,
        check_locks: bool = True,
    ) -> T:
        """The start path's (compute_node.lifecycle): files, plumbing, claim, then `launch`."""
        raise NotImplementedError

    def _init_peers(self) -> None:
        # How this node reaches the others (the node sets it: its bus); None: no migrations.
        self.peer_call: PeerCall | None = None
        # Catalog steps that must not be lost (a live move's commit), kept in the store until
        # the storage service answers; the node starts its sender.
        self.storage_steps = PendingSteps(self.store, lambda: self.peer_call)
        # Serialises the driver's events with an incoming domain's commit, so held events
        # are consumed before any later one.
        self._sink_lock = threading.RLock()

    def _peer(self, queue: str, command: Command, timeout: float = PEER_TIMEOUT_S) -> Message:
        assert self.peer_call is not None
        return self.peer_call(queue, command, timeout)

    def _unplug(self, record: DomainRecord) -> None:
        if self.networks is None or not record.ports:
            return
        try:
            self.networks.detach(list(record.ports))
        except Exception as exc:
            log.warning("ports not unplugged", domain_id=str(record.id), error=str(exc))

    def _let_go(self, record: DomainRecord) -> None:
        """The domain runs on another host: its ports, claim and definition here go, with no
        event (its driver leftovers: `_remove_leftovers`)."""
        self._unplug(record)
        self.claims.release(record.id)
        self.store.forget(record.id)

    def _remove_leftovers(self, domain_id: uuid.UUID) -> None:
        try:
            self.driver.remove(domain_id)
        except DriverError as exc:
            log.warning("driver leftovers kept", domain_id=str(domain_id), error=str(exc))
