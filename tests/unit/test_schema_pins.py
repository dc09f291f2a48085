"""Every message's JSON Schema is pinned in protos/schema/; a change needs a version bump."""

from __future__ import annotations

import json

import pytest

from protos import Message, message_types
from protos.schema import SCHEMA_DIR, render, schema_of

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
    names = {f"{t}.json" for t in message_types()}
    stale = sorted(p.name for p in SCHEMA_DIR.glob("*.json") if p.name not in names)
    assert not stale, f"schemas without a model: {stale}"


def test_schema_files_are_rendered_canonically() -> None:
    for type_name, model in ALL_TYPES:
        assert (SCHEMA_DIR / f"{type_name}.json").read_text() == render(schema_of(model))
