"""Every message's JSON Schema is pinned in protos/schema/; a change needs a version bump."""

from __future__ import annotations

import json
import uuid

import jsonschema
import msgpack
import pytest

from protos import Message, message_types
from protos.codec import decode, encode
from protos.commands import StartDomain
from protos.schema import ENVELOPE_FILE, SCHEMA_DIR, envelope_schema, render, schema_of

ALL_TYPES = sorted(message_types().items())


@pytest.mark.parametrize(("type_name", "model"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
def test_schema_is_pinned(type_name: str, model: type[Message]) -> None:
    path = SCHEMA_DIR / f"{type_name}.json"
    assert path.exists(), f"{path.name} missing: run `python -m protos.schema`"
    pinned = json.loads(path.read_text())
    current = schema_of(model)
    if pinned == current:
        return
    if pinned.get("x-flotilla-version") == current["x-flotilla-version"]:
        pytest.fail(
            f"{model.__name__} ({type_name}) changed without a version bump: "
            f"raise {model.__name__}.VERSION (minor for added optional fields, major "
            "otherwise), then run `python -m protos.schema`"
        )
    pytest.fail(f"{path.name} is stale: run `python -m protos.schema`")


def test_no_stale_schema_files() -> None:
    names = {f"{t}.json" for t in message_types()} | {ENVELOPE_FILE}
    stale = sorted(p.name for p in SCHEMA_DIR.glob("*.json") if p.name not in names)
    assert not stale, f"schemas without a model: {stale}"


def test_schema_files_are_rendered_canonically() -> None:
    for type_name, model in ALL_TYPES:
        assert (SCHEMA_DIR / f"{type_name}.json").read_text() == render(schema_of(model))


def test_envelope_schema_is_pinned() -> None:
    pinned = json.loads((SCHEMA_DIR / ENVELOPE_FILE).read_text())
    current = envelope_schema()
    if pinned != current:
        if pinned.get("x-flotilla-version") == current["x-flotilla-version"]:
            pytest.fail("the envelope schema changed: raise protos.schema.ENVELOPE_VERSION")
        pytest.fail(f"{ENVELOPE_FILE} is stale: run `python -m protos.schema`")


def test_envelopes_on_the_wire_follow_the_envelope_schema() -> None:
    """What `encode` writes validates, and what the schema refuses `decode` refuses too."""
    validator = jsonschema.Draft202012Validator(
        envelope_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    data, _ = encode(
        StartDomain(domain_id=uuid.uuid4()),
        source="api",
        correlation_id="req-1",
    )
    raw = msgpack.unpackb(data)
    validator.validate(raw)
    assert isinstance(raw["v"], str)
    assert isinstance(raw["ts"], float)
    for key, bad in (("v", 1), ("ts", "now"), ("body", []), ("source", ""), ("id", None)):
        broken = {**raw, key: bad}
        assert not validator.is_valid(broken), key
        with pytest.raises(ValueError, match=key):
            decode(msgpack.packb(broken))
