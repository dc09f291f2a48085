"""What the start path and the incoming-migration path share: a boot source's refusal as the
caller's error, and the wait for the plumbing of a guest that did not run."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager

import structlog

from compute_node.boot_sources import SourceRefused
from services.bus import ServiceError

log = structlog.get_logger("flotilla.compute")


@contextmanager
def refused() -> Iterator[None]:
    """A spec path the rule refuses as the ServiceError the caller gets, naming the field."""
    try:
        yield
    except SourceRefused as exc:
        raise ServiceError(exc.code, exc.message, {"field": exc.field}) from None


def settle_quietly(plumbed: Future[object]) -> None:
    """Wait for plumbing whose guest did not run (its failure is not the one to report)."""
    try:
        plumbed.result()
    except Exception as exc:
        log.warning("plumbing of a guest that did not run failed", error=str(exc))
