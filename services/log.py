"""structlog, configured once per process: JSON lines off a terminal, readable on one.

Per-delivery context (message id, correlation id, domain id) is bound with
`structlog.contextvars` by the consumer runtime and cleared after each delivery.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger. Later calls do nothing."""
    global _configured
    if _configured:
        return
    _configured = True
    level_name = (level or os.environ.get("FLOTILLA_LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pika logs every reconnect attempt at WARNING/ERROR; keep its chatter out of INFO runs.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
