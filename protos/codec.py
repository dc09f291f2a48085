"""The envelope and its msgpack codec: the only way messages are turned into bytes and back.

An envelope is a msgpack map `{v, type, id, ts, source, correlation_id, causation_id, body}`,
and `expires_at` on a command its sender stops waiting for (envelope 1.1; absent otherwise).
`decode` checks the framing and `parse_body` validates the body against its registered model;
both raise `DecodeError` with a reason a human can act on, never anything else.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgspec
from pydantic import ValidationError

from protos.base import Message, lookup

CONTENT_TYPE = "application/msgpack"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


# The RFC 4122 variant nibble (10xx) for each value of a random hex digit.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def new_message_id() -> str:
    """A random (version 4) UUID in its canonical string form, as `str(uuid.uuid4())` gives,
    at less than half its cost: every message published gets one."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def body_of(message: Message) -> dict[str, Any]:
    """`message.model_dump(mode="json")`, through the model's serializer directly (the
    method's own argument handling is a good share of its cost for a small model); a
    message built from wire data (a private `_wire`, e.g. VolumePage.of_wire) is that data
    (which may hold msgspec records, such as protos.volume_wire.VolumeRow: `pack` writes
    them as the maps they stand for)."""
    private = message.__pydantic_private__
    if private:
        wire: dict[str, Any] | None = private.get("_wire")
        if wire is not None:
            return wire
    body: dict[str, Any] = type(message).__pydantic_serializer__.to_python(message, mode="json")
    return body


class DecodeError(ValueError):
    """Bytes that are not a valid Flotilla message; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded envelope. `body` is still the raw map: `parse_body` turns it into a model."""

    type: str
    body: dict[str, Any]
    v: str = "1.0"
    id: str = field(default_factory=new_message_id)
    ts: float = field(default_factory=time.time)
    source: str = ""
    correlation_id: str | None = None
    causation_id: str | None = None
    # Wall-clock seconds after which the command must not run (its sender gave up): the
    # receiving worker dead-letters it with reason `expired` (services.bus.service).
    expires_at: float | None = None

    def to_map(self) -> dict[str, Any]:
        raw = {
            "v": self.v,
            "type": self.type,
            "id": self.id,
            "ts": self.ts,
            "source": self.source,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "body": self.body,
        }
        if self.expires_at is not None:  # only commands with a deadline carry the key
            raw["expires_at"] = self.expires_at
        return raw

    def expired(self, now: float | None = None) -> bool:
        """Whether the sender's deadline (`expires_at`) has passed by this host's clock."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) > self.expires_at


def envelope_for(
    message: Message,
    *,
    source: str,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    message_id: str | None = None,
    expires_in: float | None = None,
) -> Envelope:
    """Wrap `message` in a fresh envelope (new id and timestamp unless `message_id` is given);
    with `expires_in`, it expires that many seconds after its timestamp."""
    if not message.TYPE:
        raise TypeError(f"{type(message).__name__} has no TYPE: it cannot go on the wire")
    ts = time.time()
    return Envelope(
        type=message.TYPE,
        body=body_of(message),
        v=message.VERSION,
        id=message_id or new_message_id(),
        ts=ts,
        source=source,
        correlation_id=correlation_id,
        causation_id=causation_id,
        expires_at=None if expires_in is None else ts + expires_in,
    )


class EncodeError(ValueError):
    """A message holds a value msgpack cannot carry (e.g. an integer beyond 64 bits), or is
    larger than any reader accepts (`MAX_MESSAGE_BYTES`)."""


# msgspec's encoder writes the same bytes as `msgpack.packb(..., use_bin_type=True)` for the
# values a body holds (maps, arrays, str, bin, int, float, bool, None), in one C pass, and
# also writes msgspec records (protos.volume_wire) as maps: a long reply sent as records
# needs no dict per item. tests/unit/test_volume_wire.py checks the bytes are the same.
_ENCODER = msgspec.msgpack.Encoder()


def pack(envelope: Envelope) -> bytes:
    """The envelope's bytes; EncodeError for what `decode` would refuse to read back, so a
    sender learns at once rather than by a reader's dead letter or a caller's timeout."""
    try:
        data = _ENCODER.encode(envelope.to_map())
    except (OverflowError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode {envelope.type}: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise EncodeError(
            f"{envelope.type} of {len(data)} bytes exceeds the bus limit of {MAX_MESSAGE_BYTES}"
        )
    return data


def encode(
    message: Message,
    *,
    source: str,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    message_id: str | None = None,
) -> tuple[bytes, Envelope]:
    """Return the msgpack bytes of `message` in an envelope, and that envelope."""
    envelope = envelope_for(
        message,
        source=source,
        correlation_id=correlation_id,
        causation_id=causation_id,
        message_id=message_id,
    )
    return pack(envelope), envelope


_STR_FIELDS = ("v", "type", "id", "source")
_OPTIONAL_STR_FIELDS = ("correlation_id", "causation_id")


def decode(data: bytes, content_type: str | None = CONTENT_TYPE) -> Envelope:
    """Decode an envelope; raise `DecodeError` for anything that is not one.

    `content_type` is the AMQP property as received: anything but `application/msgpack`
    (or None, for a sender that set no properties) is refused.
    """
    if content_type is not None and content_type != CONTENT_TYPE:
        raise DecodeError(f"content_type {content_type!r} is not {CONTENT_TYPE!r}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"envelope is a {type(raw).__name__}, not a map")
    for name in _STR_FIELDS:
        if not isinstance(raw.get(name), str) or not raw[name]:
            raise DecodeError(f"envelope field {name!r} missing or not a non-empty string")
    for name in _OPTIONAL_STR_FIELDS:
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise DecodeError(f"envelope field {name!r} is not a string")
    ts = raw.get("ts")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise DecodeError("envelope field 'ts' missing or not a number")
    body = raw.get("body")
    if not isinstance(body, dict):
        raise DecodeError("envelope field 'body' missing or not a map")
    expires_at = raw.get("expires_at")
    if expires_at is not None and (
        not isinstance(expires_at, int | float) or isinstance(expires_at, bool)
    ):
        raise DecodeError("envelope field 'expires_at' is not a number")
    return Envelope(
        type=raw["type"],
        body=body,
        v=raw["v"],
        id=raw["id"],
        ts=float(ts),
        source=raw["source"],
        correlation_id=raw.get("correlation_id"),
        causation_id=raw.get("causation_id"),
        expires_at=None if expires_at is None else float(expires_at),
    )


class _Head(msgspec.Struct):
    """An envelope whose body is left as its msgpack bytes."""

    v: str
    type: str
    id: str
    ts: float
    source: str
    body: msgspec.Raw
    correlation_id: str | None = None
    causation_id: str | None = None


_HEAD = msgspec.msgpack.Decoder(_Head)
# A msgpack map's first byte: fixmap, map 16, map 32.
_MAP_FORMATS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def decode_head(data: bytes, content_type: str | None = CONTENT_TYPE) -> tuple[Envelope, bytes]:
    """`decode` with the same checks, but the body is returned as its msgpack bytes (the
    envelope's `body` is empty) for a reader of its own: one that checks a long body in one
    pass instead of as a map and then a model (protos.volume_wire). DecodeError as `decode`."""
    if content_type is not None and content_type != CONTENT_TYPE:
        raise DecodeError(f"content_type {content_type!r} is not {CONTENT_TYPE!r}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        head = _HEAD.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not an envelope: {exc}") from None
    for name in _STR_FIELDS:
        if not getattr(head, name):
            raise DecodeError(f"envelope field {name!r} missing or not a non-empty string")
    body = bytes(head.body)
    if not body or body[0] not in _MAP_FORMATS:
        raise DecodeError("envelope field 'body' missing or not a map")
    envelope = Envelope(
        type=head.type,
        body={},
        v=head.v,
        id=head.id,
        ts=head.ts,
        source=head.source,
        correlation_id=head.correlation_id,
        causation_id=head.causation_id,
    )
    return envelope, body


def check_version(envelope: Envelope, model: type[Message]) -> None:
    """DecodeError unless this reader of `model` can read the envelope's version."""
    try:
        major = int(envelope.v.split(".", 1)[0])
    except ValueError:
        raise DecodeError(f"bad version {envelope.v!r}") from None
    if major != model.major():
        raise DecodeError(
            f"{envelope.type} version {envelope.v} is not readable here (reader speaks "
            f"{model.VERSION})"
        )


def parse_body(envelope: Envelope) -> Message:
    """Validate the envelope's body against the model registered for its type."""
    model = lookup(envelope.type)
    if model is None:
        raise DecodeError(f"unknown message type {envelope.type!r}")
    check_version(envelope, model)
    try:
        return model.model_validate(envelope.body)
    except ValidationError as exc:
        raise DecodeError(f"invalid {envelope.type}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
