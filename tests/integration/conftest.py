from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from services.bus import Bus

pytestmark = pytest.mark.integration


MakeBus = Callable[..., Bus]


@pytest.fixture
def make_bus(amqp_url: str) -> Iterator[MakeBus]:
    """`make_bus(source=None)` starts a bus on the test broker; all are closed after the test."""
    made: list[Bus] = []

    def make(source: str | None = None) -> Bus:
        bus = Bus(amqp_url, source=source or f"test-{uuid.uuid4().hex[:6]}")
        made.append(bus)
        return bus.start(timeout=30)

    yield make
    for bus in made:
        bus.close()
