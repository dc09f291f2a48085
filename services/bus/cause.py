"""What caused the work under way: the correlation id of the whole chain (the API's request
id, or the first command's) and the id of the message that directly caused it.

One context variable carries it, the way tracing context travels: the API sets it per request,
`ServiceRunner` sets it around each handler from the message it handles, and `Bus.call`,
`Bus.send` and `Bus.publish_event*` stamp it on what they publish when the caller names no ids
of its own. Work that outlives the handler (a compute node's events, published later from its
outbox) takes the `Cause` explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from protos.codec import Envelope


@dataclass(frozen=True, slots=True)
class Cause:
    correlation_id: str | None = None
    causation_id: str | None = None

    @classmethod
    def of(cls, envelope: Envelope) -> Cause:
        """What a message causes: its chain's correlation id, and itself."""
        return cls(envelope.correlation_id, envelope.id)


_current: ContextVar[Cause | None] = ContextVar("flotilla_cause", default=None)


def current_cause() -> Cause | None:
    return _current.get()


@contextlib.contextmanager
def caused_by(cause: Cause | None) -> Iterator[None]:
    """Run the block with `cause` as the current cause."""
    token = _current.set(cause)
    try:
        yield
    finally:
        _current.reset(token)
