"""structlog setup: JSON lines in production, readable console output in a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from consumer.settings import Settings

_SECRET_WORDS = ("password", "secret", "domain_key", "token", "authorization")


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask any field whose name says it holds a secret, whatever a caller passed."""
    for key in event:
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "***"
    return event


def configure_logging(settings: Settings) -> None:
    """Route structlog and stdlib logging to stderr in the configured format and level."""
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    level = logging.getLevelNamesMapping()[settings.log_level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Library loggers (aio-pika, pymongo) stay quiet unless something is wrong.
    logging.basicConfig(stream=sys.stderr, level=max(level, logging.WARNING), force=True)
    # flufl.bounce logs a traceback for each hostile bounce a detector chokes on; the bounce
    # listener logs the reason it dropped the message instead, once, in one line.
    logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger carrying the module name."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(module=name)
    return logger
