"""The storage service assembled: catalog, shared pools, bus, outbox, runner, reconcile.

server = StorageServer(config).start()   # consumes `storage`, publishes volume events
server.stop()
"""

from __future__ import annotations

import threading

import structlog

from compute_node.storage_transfer import TransferServer
from protos.routing import STORAGE_QUEUE
from services.bus import Bus, ServiceError, ServiceRunner
from services.storage.backends import LocalBackend
from services.storage.catalog import Catalog
from services.storage.config import StorageConfig
from services.storage.outbox import OutboxPublisher
from services.storage.service import StorageService

log = structlog.get_logger("flotilla.storage")
REPLY_TTL_S = 86_400.0


class CatalogReplies:
    """Command replies recorded in the catalog (services.bus IdempotencyStore): a command
    redelivered to any replica of the same catalog is answered from its first reply."""

    def __init__(self, catalog: Catalog, ttl_s: float = REPLY_TTL_S) -> None:
        self.catalog = catalog
        self.ttl_s = ttl_s
        self._writes = 0

    def get(self, message_id: str) -> bytes | None:
        return self.catalog.reply_of(message_id, self.ttl_s)

    def put(self, message_id: str, reply: bytes) -> None:
        self.catalog.record_reply(message_id, reply)
        self._writes += 1
        if self._writes % 1000 == 0:
            self.catalog.expire_replies(self.ttl_s)


class StorageServer:
    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.catalog = Catalog.open(config.database_url, config.replica)
        # Streams into and out of the shared pools served here (image imports, uploads).
        self.transfers = (
            TransferServer(config.transfer_listen, advertise=config.transfer_advertise or None)
            if config.shared_pools
            else None
        )
        self.local = LocalBackend(dict(config.shared_pools), self.transfers)
        self.bus = Bus(config.amqp_url, source=f"storage:{config.replica}")
        self.outbox = OutboxPublisher(self.catalog.db, self.bus)
        self.service = StorageService(
            config, self.catalog, self.bus, self.local, notify=self.outbox.notify
        )
        self.runner = ServiceRunner(
            self.bus,
            self.service,
            queue=STORAGE_QUEUE,
            idempotency=CatalogReplies(self.catalog),
            concurrency=config.workers,
        )
        self._stopping = threading.Event()
        self._reconciler = threading.Thread(
            target=self._reconcile_loop, name="storage-reconcile", daemon=True
        )

    def start(self, timeout: float = 30.0) -> StorageServer:
        """Remove what killed operations left in the shared pools, connect, settle what a
        dead replica left mid-state, then serve."""
        removed = self.local.reconcile()
        for pool, names in removed.items():
            if names:
                log.info("pool reconciled", pool=pool, removed=names)
        self.service.refresh_local_pools()
        filled = self.catalog.fill_listings()
        if filled:
            log.info("volume listings filled", volumes=filled)
        if self.transfers is not None:
            self.transfers.start()
        self.bus.start(timeout)
        self.outbox.start()
        self.service.leases.start()
        for host in self.config.agent_hosts:
            try:
                self.service.refresh_host_pools(host)
            except ServiceError as exc:
                log.warning("pools of host not known yet", host=host, error=exc.message)
        self.runner.start()
        self._reconciler.start()
        log.info(
            "storage service serving",
            replica=self.config.replica,
            shared_pools=sorted(self.local.pools),
        )
        return self

    def _reconcile_loop(self) -> None:
        while True:
            try:
                self.service.reconcile()
                self.service.refresh_local_pools()
            except Exception as exc:  # the database is away: the next round retries
                log.warning("reconcile failed", error=str(exc))
            if self._stopping.wait(self.config.reconcile_interval_s):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.runner.stop()
        if self.transfers is not None:
            self.transfers.stop()
        self.service.leases.stop()
        self.outbox.stop()
        self.bus.close()
        self.catalog.close()
