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


def test_a_gauge_not_measured_yet_is_absent_not_zero() -> None:
    """Before the first evaluation (and for strategies without capacity) the series is absent: a 0
    would read as "average accuracy 0%" or "capacity exhausted". NaN clears it again."""
    metrics = Metrics()
    for name in (
        "stream_cl_average_accuracy",
        "stream_cl_average_forgetting",
        "stream_cl_stability_gap",
        "stream_cl_free_capacity_ratio",
        "stream_cl_capacity_exhausted",
        "stream_cl_model_version",
    ):
        assert metrics.sample_value(name) is None, name
    metrics.average_accuracy.set(0.75)
    assert metrics.sample_value("stream_cl_average_accuracy") == 0.75
    metrics.average_forgetting.set(float("nan"))
    assert metrics.sample_value("stream_cl_average_forgetting") is None


def test_counters_of_known_reasons_start_at_zero() -> None:
    """Every dead-letter reason and source error kind is exported at 0 before its first incident."""
    from stream_cl.metrics import DEAD_LETTER_REASONS, SOURCE_ERROR_KINDS

    metrics = Metrics()
    for reason in DEAD_LETTER_REASONS:
        assert metrics.sample_value("stream_cl_dead_letters_total", {"reason": reason}) == 0.0
    for kind in SOURCE_ERROR_KINDS:
        assert metrics.sample_value("stream_cl_source_errors_total", {"kind": kind}) == 0.0


def test_every_dead_letter_reason_the_code_raises_is_a_known_one() -> None:
    """The known reasons list stays complete: every reason string the code dead-letters with is in it."""
    import re
    from pathlib import Path

    from stream_cl.metrics import DEAD_LETTER_REASONS

    package = Path(__file__).resolve().parent.parent / "stream_cl"
    pattern = re.compile(
        r'(?:InvalidSample|InvalidKey)\("([a-z_]+)"|_reject\([^"\n]*"([a-z_]+)"|"(too_many_keys)"'
    )
    raised = {
        next(g for g in m.groups() if g)
        for path in package.rglob("*.py")
        for m in pattern.finditer(path.read_text())
    }
    assert raised and raised <= set(DEAD_LETTER_REASONS), raised - set(DEAD_LETTER_REASONS)
