"""The network service: the `network` queue's commands in, the catalog changed, events out.

    network = NetworkServer(NetworkConfig(amqp_url=url, database_url=db)).start()
    ...
    network.stop()

Replicas compete for the `network` queue and share one database (PostgreSQL). A command
that changes the catalog does it in one transaction with its events (the outbox) and its
reply (services.network.replies): all of it or none, executed once per message id.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from protos import routing
from protos.base import Message
from protos.codec import decode, envelope_for, pack, parse_body
from protos.network import (
    AllocatePorts,
    BindPorts,
    BoundPorts,
    CreateNetwork,
    DeleteNetwork,
    DhcpLeases,
    GetNetwork,
    GetPort,
    ListBoundPorts,
    ListDhcpLeases,
    ListNetworks,
    ListPorts,
    NetworkInfo,
    NetworkList,
    PortBindings,
    PortInfo,
    PortList,
    ReleasePorts,
)
from protos.replies import Done, ErrorReply
from services.bus import Bus, Context, Service, ServiceError, ServiceRunner, handles
from services.db import Database, upgrade
from services.network import networks as nets
from services.network import ports, replies
from services.network.config import DefaultNetwork, NetworkConfig
from services.network.outbox import OutboxPublisher, emit
from services.network.tables import CATALOG

log = structlog.get_logger("flotilla.network")
R = TypeVar("R", bound=Message)
# A unique constraint another replica hit first: the work is redone once it is committed.
_INTEGRITY_RETRIES = 3
# Derives the default network's id from its name, so every replica and restart agree.
_DEFAULT_IDS = uuid.UUID("0b6a7d2c-37a4-4c55-9b1e-5f0e1c0de0a1")


class NetworkService(Service):
    """Handlers only; `NetworkServer` wires them to a bus. Unit tests call them directly."""

    name = "network"

    def __init__(self, config: NetworkConfig, db: Database, source: str) -> None:
        self.config = config
        self.db = db
        self.source = source
        self.wrote_events: Callable[[], None] = lambda: None

    # ---- the one way a command changes the catalog ---------------------------------------

    def _change(
        self, ctx: Context | None, work: Callable[[Connection], tuple[R, list[Message]]]
    ) -> R:
        """Run `work` in a transaction with its events and reply; once per message id."""
        for attempt in range(_INTEGRITY_RETRIES):
            try:
                with self.db.transaction() as conn:
                    if ctx is not None:
                        replies.claim(conn, ctx.envelope.id)
                    result, events = work(conn)
                    cause = None if ctx is None else ctx.cause
                    for event in events:
                        emit(conn, event, source=self.source, cause=cause)
                    if ctx is not None:
                        replies.finish(conn, ctx.envelope.id, self._packed(result, ctx))
            except replies.Recorded as done:
                return self._recorded(done.reply)
            except sa.exc.IntegrityError:
                if attempt == _INTEGRITY_RETRIES - 1:
                    raise
                log.info("lost a race on a unique key; redoing the command")
                continue
            if events:
                self.wrote_events()
            return result
        raise AssertionError("unreachable")

    def _packed(self, result: Message, ctx: Context) -> bytes:
        envelope = envelope_for(
            result,
            source=self.source,
            correlation_id=ctx.envelope.correlation_id,
            causation_id=ctx.envelope.id,
        )
        return pack(envelope)

    @staticmethod
    def _recorded(reply: bytes) -> R:  # type: ignore[type-var]
        message = parse_body(decode(reply))
        if isinstance(message, ErrorReply):
            raise ServiceError(message.code, message.message, message.details)
        return message  # type: ignore[return-value]

    def _read(self, work: Callable[[Connection], R]) -> R:
        with self.db.transaction() as conn:
            return work(conn)

    # ---- tenant commands -------------------------------------------------------------------

    @handles(CreateNetwork)
    def create_network(self, cmd: CreateNetwork, ctx: Context | None) -> NetworkInfo:
        def work(conn: Connection) -> tuple[NetworkInfo, list[Message]]:
            network, event = nets.create(
                conn,
                cmd,
                underlay_mtu=self.config.underlay_mtu,
                quota=self.config.quota_for(cmd.project),
                now=time.time(),
            )
            return network.info(), [] if event is None else [event]

        return self._change(ctx, work)

    @handles(DeleteNetwork)
    def delete_network(self, cmd: DeleteNetwork, ctx: Context | None) -> Done:
        def work(conn: Connection) -> tuple[Done, list[Message]]:
            _, event = nets.delete(conn, cmd.network_id, cmd.project)
            return Done(), [event]

        return self._change(ctx, work)

    @handles(GetNetwork)
    def get_network(self, cmd: GetNetwork, _ctx: Context | None) -> NetworkInfo:
        def work(conn: Connection) -> NetworkInfo:
            network = nets.visible(conn, cmd.network_id, cmd.project)
            return network.info(nets.port_counts(conn).get(network.id, 0))

        return self._read(work)

    @handles(ListNetworks)
    def list_networks(self, cmd: ListNetworks, _ctx: Context | None) -> NetworkList:
        return self._read(lambda conn: NetworkList(networks=nets.listing(conn, cmd.project)))

    @handles(ListPorts)
    def list_ports(self, cmd: ListPorts, _ctx: Context | None) -> PortList:
        return self._read(
            lambda conn: PortList(
                ports=ports.listing(conn, cmd.project, cmd.network_id, cmd.domain_id)
            )
        )

    @handles(GetPort)
    def get_port(self, cmd: GetPort, _ctx: Context | None) -> PortInfo:
        return self._read(lambda conn: ports.one(conn, cmd.port_id, cmd.project))

    @handles(ListDhcpLeases)
    def dhcp_leases(self, cmd: ListDhcpLeases, _ctx: Context | None) -> DhcpLeases:
        return self._read(
            lambda conn: DhcpLeases(
                network_id=cmd.network_id,
                leases=ports.leases(conn, cmd.network_id, cmd.project),
            )
        )

    # ---- the scheduler's commands ------------------------------------------------------------

    @handles(AllocatePorts)
    def allocate_ports(self, cmd: AllocatePorts, ctx: Context | None) -> PortBindings:
        def work(conn: Connection) -> tuple[PortBindings, list[Message]]:
            bindings, events = ports.allocate(
                conn,
                cmd,
                quota=self.config.quota_for(cmd.project),
                now=time.time(),
                quarantine_s=self.config.quarantine_s,
            )
            return PortBindings(ports=bindings), list(events)

        return self._change(ctx, work)

    @handles(BindPorts)
    def bind_ports(self, cmd: BindPorts, ctx: Context | None) -> Done:
        return self._change(ctx, lambda conn: (Done(), list(ports.bind(conn, cmd))))

    @handles(ReleasePorts)
    def release_ports(self, cmd: ReleasePorts, ctx: Context | None) -> Done:
        return self._change(
            ctx, lambda conn: (Done(), list(ports.release(conn, cmd.domain_id, now=time.time())))
        )

    # ---- the compute nodes' query -------------------------------------------------------------

    @handles(ListBoundPorts)
    def bound_ports(self, cmd: ListBoundPorts, _ctx: Context | None) -> BoundPorts:
        return self._read(lambda conn: BoundPorts(ports=ports.bound_on(conn, cmd.network_ids)))

    # ---- start-up ------------------------------------------------------------------------

    def ensure_default(self, default: DefaultNetwork) -> NetworkInfo:
        """Create the shared NAT network `default` names, unless it exists (by name)."""
        with self.db.transaction() as conn:
            found = nets.by_name(conn, default.name, default.project)
        if found is not None and found.shared:
            return found.info()
        cmd = CreateNetwork(
            network_id=uuid.uuid5(_DEFAULT_IDS, f"{default.project}/{default.name}"),
            project=default.project,
            name=default.name,
            mode="nat",
            subnet=default.subnet,
            shared=True,
        )
        info = self.create_network(cmd, None)
        log.info("default network ready", name=info.name, subnet=str(info.subnet))
        return info


class NetworkServer:
    """One network service replica on a bus: catalog, handlers, runner and outbox."""

    def __init__(self, config: NetworkConfig, bus: Bus | None = None) -> None:
        self.config = config
        self._own_bus = bus is None
        self.bus = bus or Bus(config.amqp_url, source=f"network:{config.replica}")
        self.db = Database(config.database_url)
        self.service = NetworkService(config, self.db, self.bus.source)
        self.publisher = OutboxPublisher(self.db, self.bus, self.bus.source)
        self.service.wrote_events = self.publisher.wake
        self.runner = ServiceRunner(
            self.bus,
            self.service,
            queue=routing.NETWORK_QUEUE,
            idempotency=replies.SqlIdempotencyStore(self.db),
            concurrency=config.workers,
            prefetch=config.workers,
        )
        self._stopped = False

    def start(self, timeout: float = 30.0) -> NetworkServer:
        """Migrate the catalog, make the default network, then serve `network`."""
        upgrade(self.db, CATALOG)
        if self.config.default_network is not None:
            self.service.ensure_default(self.config.default_network)
        if self._own_bus:
            self.bus.start(timeout)
        self.publisher.start()
        self.runner.start()
        log.info("network service serving", replica=self.config.replica)
        return self

    def stop(self) -> None:
        """Finish the commands under way and close (again: nothing)."""
        if self._stopped:
            return
        self._stopped = True
        self.runner.stop()
        self.publisher.stop()
        if self._own_bus:
            self.bus.close()
        self.db.close()
