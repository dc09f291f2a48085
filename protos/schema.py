"""`python -m protos.schema [DIR]`: write the JSON Schema of every message to protos/schema/.

Each file is `<type>.json` and records the model's version as `x-flotilla-version`; beside
them `envelope.json` describes the envelope every message travels in (docs/events.md). The
files are checked in; tests/unit/test_schema_pins.py fails when a model's schema changes while
its version does not (bump VERSION), or when the files are stale (rerun this).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from protos.base import Message, message_types
from protos.codec import CONTENT_TYPE, MAX_MESSAGE_BYTES

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
ENVELOPE_FILE = "envelope.json"
# The envelope's own format; a change to ENVELOPE_SCHEMA needs a bump here (the pin test).
ENVELOPE_VERSION = "1.1"  # 1.1: `expires_at`


def envelope_schema() -> dict[str, Any]:
    """The envelope as `protos.codec.decode` reads it: a msgpack map (shown as JSON)."""
    nullable_id = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Envelope",
        "description": (
            f"Every Flotilla message: a msgpack map (content type {CONTENT_TYPE}, at most "
            f"{MAX_MESSAGE_BYTES} bytes) with these keys. The body is validated against the "
            "schema of its `type` (protos/schema/<type>.json) whose major version matches "
            "`v`. Readers ignore keys they do not know, so newer writers may add some."
        ),
        "type": "object",
        "required": ["v", "type", "id", "ts", "source", "body"],
        "properties": {
            "v": {
                "type": "string",
                "pattern": r"^[0-9]+\.[0-9]+$",
                "description": "the body's model version, major.minor (a string)",
            },
            "type": {
                "type": "string",
                "minLength": 1,
                "description": "the message type, e.g. domain.started or cmd.domain.start",
            },
            "id": {
                "type": "string",
                "format": "uuid",
                "description": (
                    "the message id: a UUID string, also the AMQP message_id; commands are "
                    "executed once per id"
                ),
            },
            "ts": {
                "type": "number",
                "description": "when it was made: seconds since the Unix epoch, a float",
            },
            "source": {
                "type": "string",
                "minLength": 1,
                "description": "who made it: api, scheduler:<replica>, compute:<host>",
            },
            "correlation_id": {
                **nullable_id,
                "description": (
                    "the chain it belongs to: the API request id (X-Request-Id) or the first "
                    "command's; null on events nothing asked for"
                ),
            },
            "causation_id": {
                **nullable_id,
                "description": "the id of the message that caused it, or null",
            },
            "body": {"type": "object", "description": "the message, per its type's schema"},
            "expires_at": {
                "anyOf": [{"type": "number"}, {"type": "null"}],
                "description": (
                    "on a command its sender stops waiting for: seconds since the Unix epoch "
                    "after which it must not run (the worker dead-letters it, reason "
                    "`expired`); absent: no expiry"
                ),
            },
        },
        "x-flotilla-type": "envelope",
        "x-flotilla-version": ENVELOPE_VERSION,
    }


def schema_of(model: type[Message]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    schema["x-flotilla-type"] = model.TYPE
    schema["x-flotilla-version"] = model.VERSION
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    expected = set()
    for type_name, model in message_types().items():
        path = directory / f"{type_name}.json"
        expected.add(path.name)
        path.write_text(render(schema_of(model)))
        written.append(path)
    envelope = directory / ENVELOPE_FILE
    expected.add(envelope.name)
    envelope.write_text(render(envelope_schema()))
    written.append(envelope)
    for stale in directory.glob("*.json"):
        if stale.name not in expected:
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else SCHEMA_DIR
    for path in write_all(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
