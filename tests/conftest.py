"""Shared fixtures: one embedded broker per test session, a fresh topic per test, clean structlog."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest
import structlog

from stream_cl.tools.broker import EmbeddedBroker

# Daemons and replicas the tests start (in-process or as subprocesses) bind any free port for the
# OIP v2 HTTP front, never the shared default 8000; a test that needs it reads `http_port`.
os.environ.setdefault("STREAM_CL_SERVE__HTTP_PORT", "0")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A running Tansu broker shared by the session (memory-only: isolate tests by topic, not broker)."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic(broker: EmbeddedBroker) -> str:
    """A new, empty, single-partition topic on the session broker."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    broker.create_topic(name)
    return name


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Undo any `configure_logging` a test did, so log config never leaks into the next test."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_stream_cl", False)]:
        root.removeHandler(handler)
