"""structlog setup: JSON lines by default, a readable console renderer on a TTY.

Event names are stable snake_case strings (`sample_dead_lettered`, `task_boundary`, ...): dashboards
and alerts may key on them. Nothing is configured at import; the CLI calls `configure_logging`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # kafka-python logs through stdlib logging; keep its chatter at warnings. Its selector warns
    # whenever one poll task runs >100 ms, which a loaded machine does routinely: noise, not news.
    logging.basicConfig(level=logging.WARNING, stream=stream)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
