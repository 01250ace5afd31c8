"""structlog JSON logs. Per-message context (task_id, tenant, trace_id) is bound with contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _stderr_logger(*_: Any) -> structlog.PrintLogger:
    """A logger printing to the stderr of the moment (one replaced since configuration, as a test's capture
    is, is followed, never written to after it was closed)."""
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: str, service: str) -> None:
    """Log JSON lines to stderr at `level`, each carrying the service name and any bound context."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        # Not cached: a module's logger then follows the latest configuration, so a process that configures
        # logging again (an in-process CLI, a test) never keeps a logger bound to the earlier level or file.
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


def bind_message_context(**values: Any) -> None:
    """Bind values (task_id, tenant, trace_id) to every log line of the current asyncio task."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in values.items() if v is not None})


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger; its lines carry the context bound for the current message."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
