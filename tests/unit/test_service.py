"""The consumer runtime's pure parts: decorators only register; dispatch maps errors."""

from __future__ import annotations

import uuid

import pytest
from structlog.testing import capture_logs

from protos.codec import Envelope
from protos.commands import DestroyDomain, GetDomainInfo, PauseDomain
from protos.domain import PowerState
from protos.replies import DomainInfo, Done, ErrorReply
from services.bus import Context, Service, ServiceError, handles, on_event
from services.bus.service import dispatch


class Sample(Service):
    name = "sample"

    @handles(GetDomainInfo)
    def info(self, cmd: GetDomainInfo, ctx: Context) -> DomainInfo:
        return DomainInfo(
            domain_id=cmd.domain_id,
            name="x",
            host="h",
            state=PowerState.SHUTOFF,
            vcpus=1,
            memory_mib=64,
            seq=0,
        )

    @handles(DestroyDomain)
    def destroy(self, cmd: DestroyDomain, ctx: Context) -> None:
        raise ServiceError("conflict", "domain is not running", {"state": "shutoff"})

    @on_event("domain.started.*", "domain.stopped.*")
    def seen(self, event: object, ctx: Context) -> None:
        pass


CTX = Context(Envelope(type="t", body={}, source="s"))


def test_decorators_return_the_plain_method() -> None:
    service = Sample()
    reply = service.info(GetDomainInfo(domain_id=uuid.uuid4()), CTX)
    assert isinstance(reply, DomainInfo)
    assert set(service.command_handlers()) == {GetDomainInfo, DestroyDomain}
    assert sorted(p for p, _ in service.event_handlers()) == [
        "domain.started.*",
        "domain.stopped.*",
    ]


def test_dispatch_maps_service_errors_and_unknown_commands() -> None:
    service = Sample()
    error = dispatch(service, DestroyDomain(domain_id=uuid.uuid4()), CTX)
    assert error == ErrorReply(
        code="conflict", message="domain is not running", details={"state": "shutoff"}
    )
    unknown = dispatch(service, PauseDomain(domain_id=uuid.uuid4()), CTX)
    assert isinstance(unknown, ErrorReply)
    assert unknown.code == "invalid"


def test_a_handler_returning_none_answers_done() -> None:
    class Quiet(Service):
        @handles(PauseDomain)
        def pause(self, cmd: PauseDomain, ctx: Context) -> None:
            return None

    assert dispatch(Quiet(), PauseDomain(domain_id=uuid.uuid4()), CTX) == Done()


def test_two_handlers_for_one_command_are_refused() -> None:
    class Twice(Service):
        @handles(PauseDomain)
        def a(self, cmd: PauseDomain, ctx: Context) -> None: ...

        @handles(PauseDomain)
        def b(self, cmd: PauseDomain, ctx: Context) -> None: ...

    with pytest.raises(TypeError, match="two handlers"):
        Twice().command_handlers()


def test_unexpected_errors_propagate_to_the_runner() -> None:
    class Broken(Service):
        @handles(PauseDomain)
        def pause(self, cmd: PauseDomain, ctx: Context) -> None:
            raise RuntimeError("bug")

    with capture_logs(), pytest.raises(RuntimeError, match="bug"):
        dispatch(Broken(), PauseDomain(domain_id=uuid.uuid4()), CTX)
