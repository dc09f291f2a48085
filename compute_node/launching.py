"""What the start path and the incoming-migration path share besides `Lifecycle._run_plumbed`:
a boot source's refusal as the caller's error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from compute_node.boot_sources import SourceRefused
from services.bus import ServiceError


@contextmanager
def refused() -> Iterator[None]:
    """A spec path the rule refuses as the ServiceError the caller gets, naming the field."""
    try:
        yield
    except SourceRefused as exc:
        raise ServiceError(exc.code, exc.message, {"field": exc.field}) from None
