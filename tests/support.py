"""Helpers shared by the tests that run a real daemon (imported as `support`; pytest puts tests/ on the path)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def kafka_overrides(bootstrap_servers: str, topic: str) -> list[str]:
    """Config overrides that give a test daemon its own topic, dead-letter topic and consumer group."""
    return [
        f"kafka.bootstrap_servers={bootstrap_servers}",
        f"kafka.topic={topic}",
        f"kafka.dead_letter_topic={topic}.dlq",
        f"kafka.group_id=g-{topic}",
    ]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `predicate` until it is truthy; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
