"""The scheduler's unit tests' compute nodes, without a broker: `FakeComputes` behind
`SchedulerService.call`, a service fed with their heartbeats (`service`), and `route` to put a
test's own answers in front of them."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from protos.base import Message
from protos.codec import envelope_for
from protos.commands import Command, DefineDomain, DestroyDomain, StartDomain, UndefineDomain
from protos.domain import BootSpec, DomainSpec, PlacementHints, PowerState
from protos.host import HostHeartbeat
from protos.replies import DomainInfo
from protos.scheduler import Placement, ScheduleDomain
from services.bus import Context, RemoteError, RpcTimeout
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from tests.unit.test_scheduler_filters import beat


def spec(vcpus: int = 1, memory_mib: int = 512, **placement: object) -> DomainSpec:
    return DomainSpec(
        name=f"d-{uuid.uuid4().hex[:8]}",
        vcpus=vcpus,
        memory_mib=memory_mib,
        boot=BootSpec(kernel="/k"),
        placement=PlacementHints(**placement),  # type: ignore[arg-type]
    )


def ctx(command: Message) -> Context:
    return Context(envelope_for(command, source="test"))


def info(spec_: DomainSpec, host: str, state: PowerState = PowerState.RUNNING) -> DomainInfo:
    return DomainInfo(
        domain_id=spec_.uuid,
        name=spec_.name,
        host=host,
        state=state,
        vcpus=spec_.vcpus,
        memory_mib=spec_.memory_mib,
        seq=1,
    )


class FakeComputes:
    """Compute nodes behind `SchedulerService.call`: each holds claims atomically against its
    limits, as the real one does, and can be told to refuse or to stay silent."""

    def __init__(self, limits: dict[str, tuple[int, int]]) -> None:
        self.limits = limits
        self.used: dict[str, Counter[str]] = {h: Counter() for h in limits}
        self.defined: dict[str, dict[uuid.UUID, DomainSpec]] = {h: {} for h in limits}
        self.running: dict[str, set[uuid.UUID]] = {h: set() for h in limits}
        self.calls: list[tuple[str, str]] = []
        self.commands: list[Command] = []
        self.refuse: dict[str, str] = {}  # host → error code for StartDomain
        self.silent: set[str] = set()
        self.refusals = 0
        self.lock = threading.Lock()
        self.delay = 0.0
        # Nodes of DefineDomain 1.7 start a domain defined with `and_start` in the same
        # command; False: older nodes, which leave that to StartDomain.
        self.and_start = True

    def __call__(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        host = queue.removeprefix("compute.")
        with self.lock:
            self.calls.append((host, command.TYPE))
            self.commands.append(command)
        if host in self.silent:
            raise RpcTimeout(f"{command.TYPE} to {queue!r}: no reply")
        if isinstance(command, DefineDomain):
            with self.lock:
                self.defined[host][command.spec.uuid] = command.spec
            if command.start and command.and_start and self.and_start:
                return self._start(host, command.spec.uuid)
            return info(command.spec, host, PowerState.SHUTOFF)
        if isinstance(command, StartDomain):
            return self._start(host, command.domain_id)
        if isinstance(command, UndefineDomain):
            with self.lock:
                self.defined[host].pop(command.domain_id, None)
            return info(spec(), host)
        if isinstance(command, DestroyDomain):
            return info(spec(), host)
        raise AssertionError(command)

    def _start(self, host: str, domain_id: uuid.UUID) -> Message:
        time.sleep(self.delay)
        code = self.refuse.get(host)
        if code:
            raise RemoteError(code, f"{host} says {code}")
        with self.lock:
            s = self.defined[host][domain_id]
            if s.uuid in self.running[host]:
                return info(s, host)
            vcpus, mib = self.limits[host]
            used = self.used[host]
            if used["vcpus"] + s.vcpus > vcpus or used["mib"] + s.memory_mib > mib:
                self.refusals += 1
                raise RemoteError("no_capacity", f"{host} is full")
            used["vcpus"] += s.vcpus
            used["mib"] += s.memory_mib
            self.running[host].add(s.uuid)
        return info(s, host)

    def heartbeats(self, interval_s: float = 60.0) -> list[HostHeartbeat]:
        with self.lock:
            return [
                beat(
                    h,
                    vcpus=v,
                    memory_mib=m,
                    used_vcpus=self.used[h]["vcpus"],
                    used_mib=self.used[h]["mib"],
                    interval_s=interval_s,
                )
                for h, (v, m) in self.limits.items()
            ]


def service(computes: FakeComputes, **config: object) -> SchedulerService:
    config.setdefault("replica", "r1")
    svc = SchedulerService(SchedulerConfig(**config))  # type: ignore[arg-type]
    svc.call = computes  # type: ignore[method-assign]
    feed(svc, computes)
    return svc


def feed(svc: SchedulerService, computes: FakeComputes) -> None:
    sent_at = time.time()  # before usage is read: a beat sent at t shows all taken before t
    for hb in computes.heartbeats():
        svc.state.on_heartbeat(hb, sent_at=sent_at, now=time.monotonic())


def schedule(svc: SchedulerService, cmd: ScheduleDomain) -> Placement:
    return svc.schedule(cmd, ctx(cmd))


@dataclass(frozen=True)
class Sent:
    """A call the service made, as a `route` hook sees it."""

    queue: str
    command: Command
    message_id: str | None
    expires: bool


def route(
    svc: SchedulerService, computes: FakeComputes, hook: Callable[[Sent], Message | None]
) -> None:
    """Send `svc`'s calls to `hook` first: what it answers (or raises) is the answer; None
    passes the call on to `computes`."""

    def call(
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        answer = hook(Sent(queue, command, message_id, expires))
        if answer is not None:
            return answer
        return computes(queue, command, timeout=timeout, message_id=message_id)

    svc.call = call  # type: ignore[method-assign]
