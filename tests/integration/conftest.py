from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from services.bus import Bus

pytestmark = pytest.mark.integration


@pytest.fixture
def make_bus(amqp_url: str) -> Iterator[type[Bus]]:
    """Start buses on the test broker; all are closed after the test."""
    made: list[Bus] = []

    class _Bus(Bus):
        def __init__(self, source: str | None = None) -> None:
            super().__init__(amqp_url, source=source or f"test-{uuid.uuid4().hex[:6]}")
            made.append(self)
            self.start(timeout=30)

    yield _Bus
    for bus in made:
        bus.close()
