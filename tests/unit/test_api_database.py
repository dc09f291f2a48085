"""The API while its registry's database is away: a problem document, not a crash."""

from __future__ import annotations

import socket
from pathlib import Path

from fastapi.testclient import TestClient

from services.api import ApiConfig, TokenEntry, create_app
from services.api.registry import Registry
from services.db import Database
from tests.unit.test_api import FakeCloud

TOKEN = "t" * 32
CONFIG = ApiConfig(tokens=[TokenEntry(token=TOKEN, project="alice")], consume_events=False)


def test_a_registry_that_is_away_answers_503(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once it is closed
    registry = Registry(Database(f"postgresql://flotilla@127.0.0.1:{port}/registry"))
    cloud = FakeCloud(tmp_path, registry)
    try:
        with TestClient(create_app(CONFIG, registry=registry, bus=cloud)) as client:
            response = client.get("/v1/domains", headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "5"
            problem = response.json()
            assert problem["code"] == "database_unavailable"
            assert str(port) not in problem["detail"]  # no addresses for tenants
            assert client.get("/healthz").json()["database"] is False
    finally:
        cloud.close()
        registry.close()
