"""protos.codec.decode_head: `decode`'s checks, with the body left as its bytes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest

from protos.codec import DecodeError, Envelope, check_version, decode, decode_head
from protos.volumes import VolumePage


def _envelope(**changes: Any) -> dict[str, Any]:
    env = Envelope(
        type="reply.catalog_volume_page",
        body={"volumes": [], "next": "p/x"},
        source="storage",
        correlation_id="c",
    )
    return {**env.to_map(), **changes}


def test_the_head_is_decode_s_envelope_and_the_body_its_bytes() -> None:
    data = msgpack.packb(_envelope())
    head, body = decode_head(data)
    full = decode(data)
    assert head == replace(full, body={})
    assert msgpack.unpackb(body) == full.body


BAD: list[tuple[str, Any]] = [
    ("type", ""),
    ("type", None),
    ("v", 1),
    ("id", ""),
    ("source", None),
    ("ts", "now"),
    ("ts", True),
    ("correlation_id", 5),
    ("body", [1]),
    ("body", "x"),
    ("body", None),
]


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_what_decode_refuses_decode_head_refuses(key: str, value: Any) -> None:
    data = msgpack.packb({**_envelope(), key: value})
    with pytest.raises(DecodeError):
        decode(data)
    with pytest.raises(DecodeError):
        decode_head(data)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]), b"\x81\xa1v"])
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_head(data)


def test_content_type_and_size_are_checked() -> None:
    data = msgpack.packb(_envelope())
    with pytest.raises(DecodeError, match="content_type"):
        decode_head(data, "application/json")
    with pytest.raises(DecodeError, match="exceeds"):
        decode_head(data + b" " * (16 * 1024 * 1024))


def test_a_reader_takes_its_own_major_version_only() -> None:
    head, _ = decode_head(msgpack.packb(_envelope(v="1.7")))
    check_version(head, VolumePage)
    head, _ = decode_head(msgpack.packb(_envelope(v="2.0")))
    with pytest.raises(DecodeError, match="not readable"):
        check_version(head, VolumePage)
