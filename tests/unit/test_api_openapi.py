"""docs/openapi.json is the API's OpenAPI document as served; it must not go stale."""

from __future__ import annotations

import json

from services.api.openapi import OPENAPI_PATH, document, render


def test_openapi_document_is_current() -> None:
    assert OPENAPI_PATH.exists(), "docs/openapi.json missing: run `python -m services.api.openapi`"
    assert OPENAPI_PATH.read_text() == render(document()), (
        "docs/openapi.json is stale: run `python -m services.api.openapi`"
    )


def test_openapi_documents_problems_and_auth() -> None:
    doc = json.loads(OPENAPI_PATH.read_text())
    create = doc["paths"]["/v1/domains"]["post"]
    assert "application/problem+json" in create["responses"]["422"]["content"]
    assert {"403", "409", "503"} <= create["responses"].keys()
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
