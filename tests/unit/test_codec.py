"""The envelope codec: every message type round-trips; anything else is a DecodeError."""

from __future__ import annotations

import uuid

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import DecodeError, Message, decode, encode, message_types, parse_body
from protos.codec import EncodeError, Envelope, body_of, envelope_for, new_message_id, pack
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainStarted, StartedDetail
from protos.replies import Done, ErrorReply
from tests.unit.strategies import messages

ALL_TYPES = sorted(message_types().items())


@pytest.mark.parametrize(("type_name", "model"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
def test_every_message_type_round_trips(type_name: str, model: type[Message]) -> None:
    # A busy CI machine makes generation slow; speed is not what this test checks. 25
    # examples a type (was 40): the big specs (DomainSpec inside define, schedule,
    # prepare_incoming) took 8-9 s each to generate on a loaded host.
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
    )
    @given(messages(model))
    def round_trip(message: Message) -> None:
        # The fast body is exactly what model_dump gives: the wire format stays as pinned.
        assert body_of(message) == message.model_dump(mode="json")
        data, sent = encode(message, source="test", correlation_id="c-1")
        received = decode(data)
        assert received == sent
        assert received.type == type_name
        assert parse_body(received) == message

    round_trip()


def test_envelope_fields_travel() -> None:
    event = DomainStarted(
        domain_id=uuid.uuid4(),
        name="web-1",
        host="node-1",
        seq=3,
        state=PowerState.RUNNING,
        detail=StartedDetail.BOOTED,
    )
    data, env = encode(event, source="compute:node-1", causation_id="cause", message_id="m-1")
    got = decode(data, "application/msgpack")
    assert (got.id, got.source, got.causation_id, got.v) == (
        "m-1",
        "compute:node-1",
        "cause",
        DomainStarted.VERSION,
    )
    assert got.ts == pytest.approx(env.ts)


@given(st.binary(max_size=200))
def test_garbage_is_a_decode_error(data: bytes) -> None:
    try:
        envelope = decode(data)
    except DecodeError as exc:
        assert exc.reason
        return
    with pytest.raises(DecodeError):
        parse_body(envelope)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"type": "x"}), "'v'"),
        (b"\xc1", "not msgpack"),
        (
            msgpack.packb({"v": "1.0", "type": "t", "id": "i", "source": "s", "ts": "x"}),
            "'ts'",
        ),
        (
            msgpack.packb({"v": "1.0", "type": "t", "id": "i", "source": "s", "ts": 1, "body": 3}),
            "'body'",
        ),
    ],
)
def test_bad_envelopes_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(raw)


def test_content_type_is_checked() -> None:
    data, _ = encode(Done(), source="x")
    with pytest.raises(DecodeError, match="content_type"):
        decode(data, "application/json")


def test_unknown_type_and_newer_major_version_are_refused() -> None:
    with pytest.raises(DecodeError, match="unknown message type"):
        parse_body(Envelope(type="nope.nothing", body={}))
    with pytest.raises(DecodeError, match=r"version 2\.0"):
        parse_body(Envelope(type="reply.done", body={}, v="2.0"))


def test_older_or_newer_minor_version_is_read() -> None:
    # A newer writer's extra field is ignored; an older writer's missing optional is defaulted.
    body = {"code": "conflict", "message": "m", "added_in_1_1": True}
    parsed = parse_body(Envelope(type="reply.error", body=body, v="1.1"))
    assert parsed.model_dump() == {"code": "conflict", "message": "m", "details": {}}


def test_invalid_body_names_the_field() -> None:
    spec = DomainSpec(name="a", boot=BootSpec(kernel="/k"))
    data = pack(
        Envelope(
            type="cmd.domain.define",
            source="test",
            body={"spec": {**spec.model_dump(mode="json"), "vcpus": 0}},
        )
    )
    with pytest.raises(DecodeError, match=r"spec\.vcpus"):
        parse_body(decode(data))


def test_unencodable_values_raise_encode_error() -> None:
    with pytest.raises(EncodeError, match=r"reply\.error"):
        encode(ErrorReply(code="x", message="y", details={"n": 2**70}), source="t")


def test_message_ids_are_distinct_version_4_uuids() -> None:
    ids = [new_message_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_an_expiry_travels_only_when_set_and_is_checked_against_the_clock() -> None:
    command = Done()
    data, sent = encode(command, source="api")
    assert "expires_at" not in msgpack.unpackb(data)
    assert decode(data).expires_at is None
    assert not decode(data).expired(now=sent.ts + 1e9)
    envelope = envelope_for(command, source="scheduler:r1", expires_in=20.0)
    got = decode(pack(envelope))
    assert got.expires_at == pytest.approx(envelope.ts + 20.0)
    assert not got.expired(now=envelope.ts + 19.9)
    assert got.expired(now=envelope.ts + 20.1)


def test_an_expiry_that_is_not_a_number_is_refused() -> None:
    raw = msgpack.unpackb(pack(envelope_for(Done(), source="api")))
    for bad in ("soon", True, [1]):
        with pytest.raises(DecodeError, match="expires_at"):
            decode(msgpack.packb({**raw, "expires_at": bad}))
