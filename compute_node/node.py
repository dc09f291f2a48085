"""The compute node assembled: store, driver, lifecycle service, storage agent, outbox,
heartbeat, adoption.

node = ComputeNode(config).start()   # consumes compute.<host> and storage.<host>
...
node.stop()                          # guests keep running; a new node re-adopts them
"""

from __future__ import annotations

from uuid import UUID

import structlog

from compute_node.boot_sources import BootSources
from compute_node.config import ComputeConfig
from compute_node.console import ConsoleRelay
from compute_node.driver import Driver, GuestEvent, GuestEventKind
from compute_node.heartbeat import Heartbeat
from compute_node.lifecycle import Lifecycle
from compute_node.migration_queue import MigrationQueue
from compute_node.networks import HostNetworks, NetSettings
from compute_node.outbox import OutboxPublisher
from compute_node.remote_ports import RemotePorts
from compute_node.resources import Claims
from compute_node.storage_agent import StorageAgent
from compute_node.storage_sources import StorageSources
from compute_node.storage_transfer import TransferServer
from compute_node.store import Store
from protos import routing
from protos.domain import PowerState
from protos.host import HostInventory
from services.bus import Bus, ServiceRunner
from services.bus.idempotency import SqliteIdempotencyStore

log = structlog.get_logger("flotilla.compute")


def make_driver(config: ComputeConfig) -> Driver:
    if config.driver == "fake":
        from compute_node.fake import FakeDriver  # noqa: PLC0415

        return FakeDriver(config.fake_vcpus, config.fake_memory_mib)
    from compute_node.kvm import KvmDriver  # noqa: PLC0415

    return KvmDriver(
        config.state_dir / "domains",
        spawn_timeout=config.vmm_spawn_timeout_s,
        warm_vmms=config.warm_vmms,
    )


class ComputeNode:
    def __init__(self, config: ComputeConfig, driver: Driver | None = None) -> None:
        self.config = config
        self.driver = driver or make_driver(config)
        source = f"compute:{config.host}"
        self.store = Store(config.state_dir / "compute.db", host=config.host, source=source)
        caps = self.driver.capabilities()
        self.inventory = HostInventory(
            capacity=self.driver.host_resources(),
            cpu_allocation_ratio=config.cpu_allocation_ratio,
            ram_allocation_ratio=config.ram_allocation_ratio,
            kvm=caps.kvm,
            max_vcpus_per_domain=caps.max_vcpus,
            pools=[p.name for p in config.storage_pools() if p.kind == "dir"],
        )
        self.claims = Claims(self.inventory, config.reserved_host_memory_mib)
        # Byte streams in and out of the pools (image imports, volume uploads/downloads)
        # listen where the console relay does: the API reaches both.
        self.transfers = TransferServer(
            config.console_listen, advertise=config.console_advertise or None
        )
        self.storage = StorageAgent(config.host, self.store, config.storage_pools(), self.transfers)
        self.lifecycle = Lifecycle(
            config.host,
            self.store,
            self.driver,
            self.claims,
            BootSources(config.allowed_boot_dirs),
            storage=StorageSources(config.host, self.storage.pools),
        )
        self.bus = Bus(config.amqp_url, source=source)
        # Migrations: PrepareIncoming and FinishIncoming to other nodes, BindPorts to the
        # network service, over this bus; streams come in on the migration address.
        bus = self.bus
        self.lifecycle.peer_call = lambda queue, command, timeout, message_id=None: bus.call(
            queue, command, timeout=timeout, message_id=message_id
        )
        self.lifecycle.migration_listen = config.migration_address()
        self.lifecycle.migration_queue = MigrationQueue(config.max_concurrent_migrations)
        self.lifecycle.vtep = config.net_underlay
        self.queue = routing.compute_queue(config.host)
        self.runner = ServiceRunner(
            self.bus,
            self.lifecycle,
            queue=self.queue,
            idempotency=SqliteIdempotencyStore(config.state_dir / "idempotency.db"),
            concurrency=8,
        )
        # File work on the pools has a queue and workers of its own: a long clone or wipe
        # never holds a lifecycle worker, and a lifecycle burst never delays storage.
        self.storage_queue = routing.storage_queue(config.host)
        self.storage_runner = ServiceRunner(
            self.bus,
            self.storage,
            queue=self.storage_queue,
            idempotency=SqliteIdempotencyStore(config.state_dir / "storage-idempotency.db"),
            # Two: one long copy leaves a worker for quick commands, at two connections a host.
            concurrency=2,
        )
        self.outbox = OutboxPublisher(self.store, self.bus)
        self.heartbeat = Heartbeat(
            bus=self.bus,
            host=config.host,
            inventory=self.inventory,
            claims=self.claims,
            store=self.store,
            interval_s=config.heartbeat_interval_s,
        )
        self.heartbeat.host_switch = self.lifecycle.host_switch
        self.lifecycle.switched = self.heartbeat.send_now
        self.claims.released = self.heartbeat.send_now
        # Guest NICs: KVM hosts plumb ports (compute_node/networks.py); fake hosts have none.
        self.networks: HostNetworks | None = None
        self.remote_ports: RemotePorts | None = None
        if config.driver == "kvm":
            self.networks = HostNetworks(
                config.host,
                config.state_dir,
                NetSettings(
                    netns=config.net_netns,
                    uplink=config.net_uplink,
                    underlay=config.net_underlay,
                    underlay_device=config.net_underlay_device,
                    dnsmasq_dir=config.net_dnsmasq_dir,
                    linger_s=config.net_linger_s,
                ),
            )
            self.lifecycle.networks = self.networks
            networks = self.networks
            self.heartbeat.inventory_extra = lambda: {
                "vtep": config.net_underlay,
                "network_warnings": networks.warnings(),
            }
        # Interactive consoles need a VMM's attach socket: only the KVM driver has them.
        self.relay: ConsoleRelay | None = None
        if config.driver == "kvm" and driver is None:
            self.relay = ConsoleRelay(
                config.state_dir / "domains",
                config.console_listen,
                advertise=config.console_advertise or None,
            )
            self.lifecycle.relay = self.relay

    def start(self, timeout: float = 30.0) -> ComputeNode:
        """Adopt what runs, publish what is pending, then serve commands. Returns once the
        command queue is consumed; the broker may be down (everything waits for it)."""
        self.reconcile_networks()
        self.adopt()
        self.storage.reconcile()
        self.lifecycle.states.reconcile()
        self.outbox.start()
        self.bus.start(timeout)
        if self.networks is not None:
            # Durable, bound by the networks this host carries: port events published while
            # this node was down wait for it; what it could not have heard, it asks for.
            self.remote_ports = RemotePorts(self.bus, self.config.host, self.networks).start()
        self.transfers.start()
        self.lifecycle.storage_steps.start()  # catalog steps left from before a restart
        # Autostart is for what was defined before this start (as libvirtd's): listed
        # before commands are served, so a domain defined meanwhile is not started.
        autostart = self.autostart_candidates()
        self.storage_runner.start()
        self.runner.start()
        self.heartbeat.start()
        if self.relay is not None:
            self.relay.start()
        self.autostart(autostart)
        log.info(
            "compute node serving",
            host=self.config.host,
            queue=self.queue,
            storage_queue=self.storage_queue,
            pools=sorted(self.storage.pools),
        )
        return self

    def reconcile_networks(self) -> None:
        """Make the host's plumbing match the stored ports before guests are adopted: what
        already matches is left alone (their traffic goes on); a failure is logged, and
        the affected guests' next start plugs again."""
        if self.networks is None:
            return
        ports = [p for record in self.store.all() for p in record.ports]
        try:
            changes = self.networks.reconcile(ports)
        except Exception as exc:
            log.exception("network reconcile failed", error=str(exc))
            return
        log.info("networks reconciled", ports=len(ports), changes=len(changes))

    def adopt(self) -> None:
        """Re-attach machines left running and account for what changed while we were away."""
        self.lifecycle.recover_incoming()
        self.lifecycle.end_queued_jobs()
        for record in self.store.all():
            runtime = self.driver.adopt(record.id, record.driver_n)
            current = self.store.get(record.id)
            assert current is not None
            if runtime is not None and runtime.pid is not None:
                # A machine, or a process a preserve policy kept: it holds its resources.
                self.claims.hold(current.spec)
            if runtime is None or runtime.state is PowerState.SHUTOFF:
                if current.state not in (PowerState.SHUTOFF, PowerState.NOSTATE):
                    self.lifecycle.on_guest_event(
                        GuestEvent(
                            record.id,
                            current.driver_n + 1,
                            GuestEventKind.STOPPED,
                            "failed",
                            "machine vanished while the compute node was down",
                        )
                    )
                continue
            log.info("adopted", domain_id=str(record.id), state=runtime.state.value)

    def autostart_candidates(self) -> list[UUID]:
        """The shut-off domains marked autostart, now."""
        return [
            record.id
            for record in self.store.all()
            if record.spec.autostart and record.state is PowerState.SHUTOFF
        ]

    def autostart(self, domain_ids: list[UUID]) -> None:
        """Start these domains, as a `start` command would (same lock, transition check
        and capacity claim); one that cannot start is logged, one no longer shut off or
        no longer marked autostart (a command came first) is left alone."""
        for domain_id in domain_ids:
            record = self.store.get(domain_id)
            if record is None or not record.spec.autostart:
                continue
            if record.state is not PowerState.SHUTOFF:
                continue
            try:
                self.lifecycle.start_domain(domain_id)
                log.info("autostarted", domain_id=str(domain_id), name=record.spec.name)
            except Exception as exc:
                log.warning("autostart failed", domain_id=str(domain_id), error=str(exc))

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.heartbeat.stop()
        if self.networks is not None:
            # Before the port queue's binder stops, so their bindings go too.
            self.networks.end_lingering()
        if self.remote_ports is not None:
            self.remote_ports.stop()
        self.runner.stop()
        self.storage_runner.stop()
        self.transfers.stop()
        self.outbox.stop()
        self.lifecycle.storage_steps.stop()
        self.bus.close()
        self.lifecycle.stop_migrations()
        self.driver.close()
        if self.networks is not None:
            self.networks.close()
        self.store.close()
