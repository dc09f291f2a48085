"""`python -m services.api.openapi [PATH]`: write the API's OpenAPI document (docs/openapi.json).

The file is checked in; tests/unit/test_api_openapi.py fails when it is stale (rerun this).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from services.api.app import create_app
from services.api.config import ApiConfig

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    schema = create_app(ApiConfig(), bus=None).openapi()
    # The version follows the package; pinning it would make every release "stale".
    schema["info"]["version"] = "v1"
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else OPENAPI_PATH
    path.write_text(render(document()))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
