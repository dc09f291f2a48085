"""What every endpoint works with: config, registry, the bus, metrics, auth, SSE wake-ups."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgspec
from fastapi import Request

from protos.base import Message
from protos.codec import DecodeError, EncodeError, body_of
from protos.commands import Command
from protos.routing import compute_queue
from services.api.auth import Authenticator, Principal
from services.api.config import ApiConfig
from services.api.metrics import ApiMetrics
from services.api.problems import Problem, not_found
from services.api.registry import Registry
from services.api.registry.domains import DomainRecord
from services.api.visibility import HOST_ALIAS_KEY_NAME, HostMask
from services.bus import BusError, NoRouteError, RemoteError, RpcTimeout

T = TypeVar("T")

# RemoteError codes from the scheduler or a compute node → HTTP status.
_REMOTE_STATUS = {
    "forbidden": 403,  # a host path the requester may not use
    "conflict": 409,
    "not_found": 409,  # the registry knows it, the host does not: a conflict of views
    "invalid": 422,
    "no_capacity": 503,
    "no_valid_host": 503,
    "unavailable": 503,
    "no_space": 507,  # the host's disk filled while saving: the guest runs on
    "unsupported": 501,  # the host's driver cannot do it (e.g. a driver without save)
}


class CommandBus(Protocol):
    """The part of services.bus.Bus the API uses; unit tests pass a fake."""

    def call(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float = 30.0,
        message_id: str | None = None,
        causation_id: str | None = None,
        expires: bool = False,
    ) -> Message: ...


@runtime_checkable
class ReadingBus(Protocol):
    """A bus that also hands a reply's body to a reader of its own (services.bus.Bus)."""

    def call_read(
        self, queue: str, command: Command, read: Callable[[bytes], T], *, timeout: float = 30.0
    ) -> T: ...


class Wakeup:
    """Wakes SSE streams (on their event loops) when this process logged an event; streams
    also poll, for events another replica logged."""

    def __init__(self) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its stream is gone
                pass

    async def wait(self, timeout: float) -> None:
        event = asyncio.Event()
        key = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(key)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(key)


@dataclass
class ApiContext:
    config: ApiConfig
    registry: Registry
    bus: CommandBus | None
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    wakeup: Wakeup = field(default_factory=Wakeup)
    broker_connected: Any = None  # () -> bool, when a real bus is in use

    def __post_init__(self) -> None:
        self.auth = Authenticator(self.config, self.registry)
        self._host_alias_key: str | None = None

    def host_alias_key(self) -> str:
        """The key of members' host aliases (services.api.visibility), read once."""
        if self._host_alias_key is None:
            self._host_alias_key = self.registry.access.secret(HOST_ALIAS_KEY_NAME)
        return self._host_alias_key

    def host_mask(self, caller: Principal) -> HostMask:
        return HostMask.for_caller(caller, self.registry.hosts.names, self.host_alias_key)

    def principal(self, request: Request) -> Principal:
        return self.auth.principal(request.headers.get("authorization"))

    def visible_domain(self, principal: Principal, domain_id: uuid.UUID) -> DomainRecord:
        """The domain if the caller may see it; 404 otherwise (whether or not it exists)."""
        record = self.registry.domains.get(domain_id)
        if record is None or not principal.sees(record.project):
            raise not_found(f"domain {domain_id}")
        return record

    def call(
        self, queue: str, command: Command, timeout: float | None = None, *, expires: bool = False
    ) -> Message:
        """RPC through the bus; failures become Problems (and are counted). `expires`: the
        command is not run by a worker that takes it after this call gave up (Bus.call)."""
        with self._problems(queue, command):
            return self._bus().call(
                queue, command, timeout=timeout or self.config.rpc_timeout_s, expires=expires
            )

    def call_read(self, queue: str, command: Command, read: Callable[[bytes], T]) -> T:
        """`call` for a long reply checked by `read` from its bytes (services.bus.Bus.call_read)."""
        timeout = self.config.rpc_timeout_s
        with self._problems(queue, command):
            bus = self._bus()
            if isinstance(bus, ReadingBus):
                return bus.call_read(queue, command, read, timeout=timeout)
            # A bus that returns only models (a unit test's fake): its reply goes through
            # `read` in its wire form all the same, refused as Bus.call_read refuses it.
            reply = bus.call(queue, command, timeout=timeout)
            try:
                return read(msgspec.msgpack.encode(body_of(reply)))
            except ValueError as exc:
                raise DecodeError(f"invalid {reply.TYPE}: {exc}") from None

    def _bus(self) -> CommandBus:
        if self.bus is None:
            raise Problem(503, "broker_unavailable", "the API has no broker connection")
        return self.bus

    @contextmanager
    def _problems(self, queue: str, command: Command) -> Iterator[None]:
        """The bus's failures of an RPC as Problems (and counted)."""
        try:
            yield
        except RemoteError as exc:
            self._count(command, exc.code)
            raise Problem(
                _REMOTE_STATUS.get(exc.code, 502),
                exc.code,
                exc.message,
                **{k: v for k, v in exc.details.items() if k not in ("type", "status", "title")},
            ) from None
        except NoRouteError:
            self._count(command, "no_route")
            target = queue.removeprefix("compute.")
            raise Problem(
                503, "host_unreachable", f"no queue for {target!r}: is its service running?"
            ) from None
        except RpcTimeout as exc:
            self._count(command, "timeout")
            raise Problem(504, "timeout", str(exc)) from None
        except DecodeError as exc:  # a reply the service should not have sent
            self._count(command, "bad_reply")
            raise Problem(
                502, "bad_reply", f"{command.TYPE}: the service's reply is invalid: {exc.reason}"
            ) from None
        except EncodeError as exc:  # unreachable through the models' bounds; never a 500
            self._count(command, "too_large")
            raise Problem(413, "too_large", str(exc)) from None
        except BusError as exc:
            self._count(command, "broker_unavailable")
            raise Problem(503, "broker_unavailable", f"broker unreachable: {exc}") from None

    def call_host(self, host: str, command: Command, timeout: float | None = None) -> Message:
        """A command to a compute node. It expires when this call gives up: a host that
        takes it later (its worker was down, or busy) does not run it, as the caller has
        answered its client by then (504) and the client may have done something else."""
        return self.call(compute_queue(host), command, timeout, expires=True)

    def _count(self, command: Command, code: str) -> None:
        self.metrics.rpc_errors.labels(command.TYPE, code).inc()
