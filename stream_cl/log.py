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
    """structlog for stream_cl's own events, and the same rendering for stdlib logging (kafka-python,
    asyncio): one JSON object per line (or the console renderer), each with its logger name."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _logger_name,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # kafka-python and asyncio log through stdlib logging: rendered like our own events, warnings
    # and up only. kafka-python's selector warns whenever one poll task runs >100 ms, which a loaded
    # machine does routinely: noise, not news.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler._stream_cl = True  # type: ignore[attr-defined]  # ours: replaced by the next call
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_stream_cl", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


def get_logger(name: str) -> Any:
    """A structlog logger whose events carry `logger`: the component's dotted name."""
    # "logger" is a parameter name of structlog's own constructors: bound under another key,
    # renamed by `_logger_name` when an event is rendered (the logger stays lazily configured)
    return structlog.get_logger(logger_name=name)


def _logger_name(logger: Any, method: str, event: Any) -> Any:
    if "logger_name" in event:
        event["logger"] = event.pop("logger_name")
    return event
