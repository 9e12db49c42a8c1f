"""What every daemon and replica exports and logs: conventions shared by all its series and events."""

from __future__ import annotations

import sys

import pytest

from stream_cl.metrics import Metrics, build_info


def test_build_info_names_the_running_versions() -> None:
    """`stream_cl_build_info` is one series of value 1 whose labels are the versions running."""
    metrics = Metrics()
    info = build_info()
    assert info["version"] != "unknown" and info["torch"] != "unknown"
    assert metrics.registry.get_sample_value("stream_cl_build_info", info) == 1.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics read /proc")
def test_process_and_gc_collectors_are_on_the_injected_registry() -> None:
    """Process and garbage-collector series come with every daemon's own registry, not the global one."""
    a, b = Metrics(), Metrics()
    for metrics in (a, b):
        assert metrics.registry.get_sample_value("process_cpu_seconds_total") is not None
        assert metrics.registry.get_sample_value("process_resident_memory_bytes") > 0
        assert (
            metrics.registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
        )


def test_stdlib_logging_comes_out_as_json_with_its_logger_name() -> None:
    """kafka-python and asyncio log through stdlib logging: rendered as our own events, one JSON
    object per line with `logger`, like every stream_cl event."""
    import io
    import json
    import logging

    from stream_cl.log import configure_logging, get_logger

    out = io.StringIO()
    configure_logging("info", "json", out)
    logging.getLogger("kafka.conn").warning("broker %s unreachable", "b1")
    logging.getLogger("kafka.conn").info("below the stdlib threshold")
    get_logger("stream_cl.learn.learner").info("task_boundary", task=1)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["logger"], e["event"], e["level"]) for e in lines] == [
        ("kafka.conn", "broker b1 unreachable", "warning"),
        ("stream_cl.learn.learner", "task_boundary", "info"),
    ]
