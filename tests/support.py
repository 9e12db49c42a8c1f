"""Helpers shared by the tests that run a real daemon (imported as `support`; pytest puts tests/ on the path).

The daemon's own fleet tooling (`stream_cl.tools.fleet`) already has them; the tests use the same.
"""

from __future__ import annotations

from functools import partial

from stream_cl.tools.fleet import free_port, kafka_overrides, wait_for

# Poll until a predicate is truthy; a TimeoutError naming what was awaited fails the test.
wait_until = partial(wait_for, poll_s=0.05)

__all__ = ["free_port", "kafka_overrides", "wait_until"]
