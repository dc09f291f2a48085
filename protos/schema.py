"""`python -m protos.schema [DIR]`: write the JSON Schema of every message to protos/schema/.

Each file is `<type>.json` and records the model's version as `x-flotilla-version`. The files
are checked in; tests/unit/test_schema_pins.py fails when a model's schema changes while its
version does not (bump VERSION), or when the files are stale (rerun this).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from protos.base import Message, message_types

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"


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
