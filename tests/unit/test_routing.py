from __future__ import annotations

import pytest

from protos import routing


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("domain.started.*", "domain.started.abc", True),
        ("domain.*.abc", "domain.stopped.abc", True),
        ("domain.*.abc", "domain.stopped.xyz", False),
        ("domain.#", "domain.started.abc", True),
        ("#", "host.heartbeat.n1", True),
        ("domain.started", "domain.started.abc", False),
        ("*.heartbeat.*", "host.heartbeat.n1", True),
    ],
)
def test_topic_matching_follows_amqp(pattern: str, key: str, matches: bool) -> None:
    assert routing.topic_matches(pattern, key) is matches


def test_names() -> None:
    assert routing.compute_queue("node-1") == "compute.node-1"
    assert routing.event_key("domain", "started", "u1") == "domain.started.u1"
    with pytest.raises(ValueError, match="host"):
        routing.compute_queue("bad.host")
    with pytest.raises(ValueError, match="entity id"):
        routing.event_key("domain", "started", "a.b")
