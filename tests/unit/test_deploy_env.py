"""deploy/compose.yaml configures the services through variables they actually read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.api.config import ApiConfig

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"


def test_the_api_in_compose_uses_the_postgresql_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    environment: dict[str, str] = compose["services"]["api"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = ApiConfig.load(None)
    assert config.database_url.startswith("postgresql://")
    assert config.database_url == next(
        v for v in environment.values() if v.startswith("postgresql://")
    )
