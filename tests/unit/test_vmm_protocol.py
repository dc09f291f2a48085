"""The VMM's control protocol is a closed, versioned set of records (docs/vmm.md): every
request and reply survives the wire, anything outside the set is refused with one error type,
and the VMM's power states are PowerState's."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from compute_node.vmm import protocol as p
from compute_node.vmm.frames import FrameReader, pack_frame
from compute_node.vmm.guest import Power
from compute_node.vmm.migration import check
from protos.domain import PowerState

REQUESTS: list[p.Request] = [
    p.Status(),
    p.Pause(),
    p.Resume(),
    p.Shutdown("acpi"),
    p.Destroy(),
    p.Reboot("ctrl-alt-del"),
    p.Stats(),
    p.Console(4096),
    p.Console(None),
    p.Subscribe(7),
    p.Attach(),
    p.Save("/srv/state/d1"),
    p.Snapshot(None, 1.5),
    p.Snapshot("/srv/state/s1"),
    p.Proceed(),
    p.MigrateOut("127.0.0.1", 4444, "ab" * 32),
    p.MigrateOut("10.0.0.2", 1, "0f" * 32, 0.5, 8 << 20, False, True, 30.0, "pause"),
    p.MigrationStatus(),
    p.MigrationSet(500.0, None),
    p.MigrationSet(None, 0),
    p.MigrationCancel(),
    p.CancelIncoming(),
]
REPLIES: list[p.Reply] = [
    p.Done(),
    p.StatusReply("running", 42, 1000, 3, 1.5, None, "no cgroup v2"),
    p.StatsReply({"exits": {"io": 3}}),
    p.ConsoleReply(b"\x00hello", True),
    p.Saved("paused", 12.5, 4096, 100),
    p.Held("running", 4096, 100),
    p.StatusReply("shutoff", 42, 1000, 0, 0.0, None, None, 40123),
    p.MigrationReply("precopy", iteration=2, bytes_sent=1 << 20, budget_ms=300.0),
    p.MigrationReply(
        "done", ended=True, committed=True, downtime_ms=3.5, paused_ms=4.0, source_paused=True
    ),
    p.MigrationReply("failed", ended=True, error="the target refused: wrong migration token"),
]


def wire(obj: dict[str, Any]) -> dict[str, Any]:
    reader = FrameReader(1 << 20)
    reader.feed(pack_frame(obj))
    frame = reader.next_frame()
    assert frame is not None
    return frame


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_survives_the_wire(request_: p.Request) -> None:
    frame = wire(p.encode_request(request_))
    assert frame["v"] == p.VERSION
    assert p.decode_request(frame) == request_
    assert type(p.decode_request(frame)) is type(request_)


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_every_reply_survives_the_wire(reply: p.Reply) -> None:
    decoded = p.decode_reply(wire(p.encode_reply(reply)))
    assert decoded == reply
    assert type(decoded) is type(reply)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"op": "fly"}, "unknown_op"),
        ({"nop": 1}, "unknown_op"),
        ({"op": 3}, "unknown_op"),
        ({"v": 2, "op": "status"}, "version"),
        ({"v": "1", "op": "status"}, "bad_request"),
        ({"v": True, "op": "status"}, "bad_request"),
        ({"op": "console", "max_bytes": "x"}, "bad_request"),
        ({"op": "subscribe", "from_n": True}, "bad_request"),
        ({"op": "save"}, "bad_request"),
        ({"op": "save", "directory": None}, "bad_request"),
        ({"op": "snapshot", "hold_s": "long"}, "bad_request"),
        ({"op": "migrate_out", "address": "127.0.0.1", "port": 1}, "bad_request"),
        ({"op": "migrate_out", "address": "h", "port": True, "token": "t"}, "bad_request"),
        (
            {"op": "migrate_out", "address": "h", "port": 1, "token": "t", "verify": 1},
            "bad_request",
        ),
        (
            {"op": "migrate_out", "address": "h", "port": 1, "token": "t", "auto_converge": "no"},
            "bad_request",
        ),
        ({"op": "migration_set", "max_downtime_ms": "fast"}, "bad_request"),
        ({"op": "migration_set", "bandwidth": False}, "bad_request"),
    ],
)
def test_requests_outside_the_set_are_refused_with_a_code(frame: dict[str, Any], code: str) -> None:
    with pytest.raises(p.ControlError) as refused:
        p.decode_request(frame)
    assert refused.value.code == code


def test_a_request_without_a_version_is_version_1() -> None:
    assert p.decode_request({"op": "subscribe", "from_n": 2}) == p.Subscribe(2)


def test_a_refusal_is_the_one_error_type_on_both_sides() -> None:
    error = p.ControlError("no_space", "state: No space left on device")
    with pytest.raises(p.ControlError) as raised:
        p.decode_reply(wire(p.encode_error(error)))
    assert (raised.value.code, raised.value.message) == (error.code, error.message)
    for junk in ({"ok": True, "reply": "what"}, {"ok": True, "reply": "status"}, {"x": 1}):
        with pytest.raises(p.ControlError) as bad:
            p.decode_reply(junk)
        assert bad.value.code == "bad_frame"


def test_the_vmm_power_states_are_power_states() -> None:
    assert {s.value for s in Power} <= {s.value for s in PowerState}


def test_replies_are_msgpack_maps_a_plain_client_can_read() -> None:
    body = msgpack.packb(p.encode_reply(p.Done()))
    assert msgpack.unpackb(body) == {"ok": True, "reply": "done", "journal_n": None}


def test_records_are_immutable_and_checked_when_made() -> None:
    record = p.Snapshot("/srv/s")
    assert (record.directory, record.hold_s) == ("/srv/s", 60.0)
    with pytest.raises(AttributeError):
        record.hold_s = 1.0  # type: ignore[misc]
    for bad in ((), ("a", "b", "c")):
        with pytest.raises(TypeError):
            p.Save(*bad)
    with pytest.raises(TypeError):
        p.Save("a", directory="b")  # type: ignore[misc]
    assert p.Snapshot("/srv/s") == record
    assert hash(p.Snapshot("/srv/s")) == hash(record)
    assert p.Save("/srv/s") != p.Snapshot("/srv/s")


def test_a_reply_of_an_older_vmm_without_new_fields_is_read_with_their_defaults() -> None:
    assert p.decode_reply({"ok": True, "reply": "done"}) == p.Done(journal_n=None)  # subscribe
    frame = p.encode_reply(p.StatusReply("running", 42, 1000, 3, 1.5, None, None))
    del frame["incoming_port"]
    assert p.decode_reply(frame) == p.StatusReply("running", 42, 1000, 3, 1.5, None, None)
    required = p.encode_reply(p.MigrationReply("setup"))
    del required["phase"]
    with pytest.raises(p.ControlError) as bad:
        p.decode_reply(required)
    assert bad.value.code == "bad_frame"


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"token": "ab" * 31}, "token"),
        ({"token": "AB" * 32}, "token"),
        ({"max_downtime_ms": 0.0}, "max_downtime_ms"),
        ({"max_downtime_ms": 61_000.0}, "max_downtime_ms"),
        ({"bandwidth": -1}, "bandwidth"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"timeout_action": "postcopy"}, "timeout_action"),
    ],
)
def test_a_migration_the_engine_must_not_see_is_refused_by_the_vmm(
    changes: dict[str, Any], why: str
) -> None:
    fields: dict[str, Any] = {"address": "127.0.0.1", "port": 4444, "token": "ab" * 32}
    check(p.MigrateOut(**fields))
    with pytest.raises(p.ControlError, match=why) as refused:
        check(p.MigrateOut(**{**fields, **changes}))
    assert refused.value.code == "bad_request"
