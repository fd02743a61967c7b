"""structlog setup: JSON lines for machines, pretty console on a TTY.

Secrets never reach a log line: settings hold them as SecretStr, and the ``redact`` processor
masks any key that looks like one (token, password, secret, authorization).
"""

from __future__ import annotations

import logging
import sys

import structlog

_SECRET_HINTS = ("password", "token", "secret", "authorization", "api_key")
_configured = False


def redact(_logger, _method, event_dict: dict) -> dict:
    for key in list(event_dict):
        if any(h in key.lower() for h in _SECRET_HINTS):
            event_dict[key] = "***"
    return event_dict


class _StderrLogger:
    """Writes each rendered line to whatever ``sys.stderr`` is at that moment (tests swap it)."""

    def msg(self, message: str) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
        except ValueError:  # stderr closed under us (interpreter shutdown): drop the line
            pass

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger_factory(*_args) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str = "INFO", fmt: str = "auto", *, force: bool = False) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    global _configured
    if _configured and not force:
        return
    _configured = True
    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer = structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
