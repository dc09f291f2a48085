"""The API answers as its OpenAPI document says: problem+json for every error (as declared),
a malformed body named as such (400), and 405 with every method the path takes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api import create_app
from services.api.problems import PROBLEM_JSON
from services.api.registry import Registry
from tests.unit.test_api import ALICE, CONFIG, FakeCloud, auth, problem

JSON = {**auth(ALICE), "Content-Type": "application/json"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    registry = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    fake = FakeCloud(tmp_path, registry)
    with TestClient(create_app(CONFIG, registry=registry, bus=fake)) as c:
        yield c
    fake.close()
    registry.close()


def test_a_truncated_body_is_400_saying_where(client: TestClient) -> None:
    r = client.post("/v1/domains", content=b'{"name": "a", "boot": {', headers=JSON)
    p = problem(r, 400)
    assert (p["code"], p["field"]) == ("malformed_body", "body")
    assert p["detail"].startswith("the body is not JSON: ")
    assert p["detail"].endswith("at byte 23")


def test_a_body_that_is_not_text_is_400_saying_why(client: TestClient) -> None:
    r = client.post("/v1/domains", content=b"\xff\xfe\x00", headers=JSON)
    p = problem(r, 400)
    assert p["code"] == "malformed_body"
    assert "UnicodeDecodeError" in p["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/domains", "GET, POST"),
        ("PUT", "/v1/domains", "GET, POST"),
        ("PATCH", "/v1/domains/00000000-0000-0000-0000-000000000000", "DELETE, GET"),
        ("GET", "/v1/domains/00000000-0000-0000-0000-000000000000/actions", "POST"),
        # A route of its own beside a template it also matches: only its own methods.
        ("OPTIONS", "/v1/volumes/upload", "POST"),
        ("OPTIONS", "/v1/images/from-host", "POST"),
        ("GET", "/v1/volumes/upload", "POST"),
        ("DELETE", "/v1/images/from-host", "POST"),
        ("PUT", "/v1/images/00000000-0000-0000-0000-000000000000", "DELETE, GET"),
    ],
)
def test_405_allows_every_method_of_the_path(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    r = client.request(method, path, headers=auth(ALICE))
    assert problem(r, 405)["code"] == "method_not_allowed"
    assert r.headers["allow"] == allowed


def test_the_document_declares_problem_json_for_every_error(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            for status, answer in answers.items():
                if int(status) >= 400:
                    assert list(answer["content"]) == [PROBLEM_JSON], (method, path, status)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= answers.keys(), (method, path)


def test_the_served_document_is_the_checked_in_one(client: TestClient) -> None:
    from services.api.openapi import OPENAPI_PATH, render

    served = client.get("/openapi.json").json()
    served["info"]["version"] = "v1"
    assert render(served) == OPENAPI_PATH.read_text()


def test_the_document_uses_json_schema_keywords_only(client: TestClient) -> None:
    """pydantic writes bounds it cannot place as `ge`/`le`, which validators ignore."""
    found: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            found.extend(f"{path}.{k}" for k in ("ge", "le", "gt", "lt") if k in node)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(client.get("/openapi.json").json()["components"], "components")
    assert found == []


def test_a_volume_or_image_id_that_is_no_uuid_is_404(client: TestClient) -> None:
    for path in ("/v1/volumes/not-a-uuid", "/v1/images/not-a-uuid"):
        r = client.get(path, headers=auth(ALICE))
        assert problem(r, 404)["code"] == "not_found", r.text
