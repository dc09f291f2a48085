"""The AMQP properties a publish carries: built directly, they are what pika's constructor
makes and encode to the same bytes."""

from __future__ import annotations

import pika
import pytest

from protos.codec import Envelope
from services.bus.bus import properties_for


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("reply_to", [None, "amq.rabbitmq.reply-to.g1h2"])
@pytest.mark.parametrize("headers", [None, {"x-flotilla-reason": "bad"}])
def test_properties_match_pikas_constructor(
    persistent: bool, reply_to: str | None, headers: dict[str, str] | None
) -> None:
    envelope = Envelope(type="domain.started", body={}, correlation_id="c-1", ts=1700000000.7)
    ours = properties_for(envelope, persistent=persistent, reply_to=reply_to, headers=headers)
    theirs = pika.BasicProperties(
        content_type="application/msgpack",
        message_id=envelope.id,
        correlation_id="c-1",
        type="domain.started",
        timestamp=1700000000,
        delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
        reply_to=reply_to,
        headers=headers,
    )
    assert vars(ours) == vars(theirs)
    assert ours.encode() == theirs.encode()
    # Each publish gets its own object: a caller may change it (dead letters add headers).
    assert properties_for(envelope) is not properties_for(envelope)
