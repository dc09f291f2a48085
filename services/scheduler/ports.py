"""The domain's ports from the network service (services.network): allocated before any host
is asked (a retry elsewhere, or a redelivered command, gets the same ones: AllocatePorts is
idempotent by domain), bound to each host as it is asked (beside its define and start:
services.scheduler.spawning), so the last one's binding is the domain's, released when no
host took the domain.

Mixed into the scheduler service (services.scheduler.service), whose state and bus seam
(`call`) it uses.
"""

from __future__ import annotations

import uuid

import structlog

from protos import routing
from protos.base import Message
from protos.bindings import PortBinding
from protos.commands import Command
from protos.network import AllocatePorts, BindPorts, PortBindings, ReleasePorts
from protos.scheduler import ScheduleDomain
from services.bus import BusError, NoRouteError, RemoteError, RpcTimeout, ServiceError
from services.scheduler.core import SchedulerCore
from services.scheduler.spawning import derived_id

log = structlog.get_logger("flotilla.scheduler")


class Ports(SchedulerCore):
    """The network service's part of a placement; the scheduler service provides the rest."""

    def _allocate_ports(self, cmd: ScheduleDomain, request_id: str) -> list[PortBinding]:
        """The domain's ports, one per NIC in order. A refusal (unknown network, address or
        MAC taken, ...) is the caller's answer as it is; no network service is `unavailable`."""
        command = AllocatePorts(domain_id=cmd.spec.uuid, project=cmd.project, nics=cmd.spec.nics)
        reply = self._network(command, f"{request_id}:ports")
        if not isinstance(reply, PortBindings) or len(reply.ports) != len(cmd.spec.nics):
            raise ServiceError("internal", f"the network service answered {reply!r}")
        log.info("ports allocated", ports=[str(p.port_id) for p in reply.ports])
        return list(reply.ports)

    def _bind_ports(self, domain_id: uuid.UUID, host: str, request_id: str) -> None:
        """Tell the network service where the ports live (it announces `port.bound`, from
        which the other hosts learn this host's VXLAN address for them). Run beside the
        host's define and start: a failure is logged, not the caller's (the ports work on
        the host; only its peers on other hosts lack their entries until a rebinding)."""
        with self.state.lock:
            known = self.state.hosts.get(host)
            vtep = known.inventory.vtep if known is not None else None
        try:
            self._network(
                BindPorts(domain_id=domain_id, host=host, vtep=vtep), f"{request_id}:bind:{host}"
            )
        except ServiceError as exc:
            log.warning("ports not bound", host=host, code=exc.code, error=exc.message)

    def _release_ports(self, domain_id: uuid.UUID) -> None:
        """Placement failed: the ports (and their addresses) go back; best effort."""
        try:
            self._network(ReleasePorts(domain_id=domain_id), None)
            log.info("ports released")
        except ServiceError as exc:
            log.warning("ports not released", code=exc.code, error=exc.message)

    def _network(self, command: Command, key: str | None) -> Message:
        """RPC to the network service; its errors and absence as ServiceError."""
        message_id = None if key is None else derived_id(key)
        try:
            return self.call(
                routing.NETWORK_QUEUE,
                command,
                timeout=self.config.compute_timeout_s,
                message_id=message_id,
            )
        except RemoteError as exc:
            raise ServiceError(exc.code, f"network service: {exc.message}", exc.details) from None
        except NoRouteError:
            raise ServiceError(
                "unavailable", "NICs need the network service, and none is running"
            ) from None
        except (RpcTimeout, BusError) as exc:
            raise ServiceError("unavailable", f"network service: {exc}") from None
