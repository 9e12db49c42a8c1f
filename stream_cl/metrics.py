"""Prometheus collectors, all on an injected `CollectorRegistry` (never the global default).

Names and labels are the contract in docs/metrics.md; dashboards and alert rules key on them. Labels
stay bounded: `task` labels are capped at `max_task_labels` (the most recent tasks).
"""

from __future__ import annotations

import contextlib
import math
import platform
import threading
from collections import OrderedDict
from collections.abc import Iterator
from importlib import metadata
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Label values known up front: their counters are exported at 0 from the start, so a rate() over
# them has data before the first incident (docs/metrics.md lists what each means).
DEAD_LETTER_REASONS = (
    "not_msgpack",
    "not_a_map",
    "missing_x",
    "bad_type",
    "bad_length",
    "bad_shape",
    "not_finite",
    "too_large",
    "too_many_classes",
    "missing_key",
    "bad_key",
    "too_many_keys",
)
SOURCE_ERROR_KINDS = ("poll", "commit")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def build_info() -> dict[str, str]:
    """Versions of stream_cl and what it runs on, for `stream_cl_build_info` and `--version`."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("stream-cl"),
        "python": platform.python_version(),
        "torch": version("torch"),
        "kafka_python": version("kafka-python"),
    }


class MeasuredGauge(Collector):
    """A gauge exported only once measured: before the first `set` (and after `clear`) the series
    is absent, not a 0 that a dashboard or an alert would read as a measurement."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        """Export `value`; NaN (nothing to measure yet, e.g. forgetting with one task) clears it."""
        value = float(value)
        self._value = None if math.isnan(value) else value

    def clear(self) -> None:
        self._value = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation)
        value = self._value
        if value is not None:
            family.add_metric([], value)
        yield family


class Metrics:
    """Every series the daemon exports. One instance per daemon, passed to each component."""

    def __init__(self, registry: CollectorRegistry | None = None, max_task_labels: int = 64) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_task_labels = max_task_labels
        r = self.registry
        # The process's CPU, memory and file descriptors (Linux) and the garbage collector's work,
        # on this registry like every other series (prometheus_client registers them only globally).
        ProcessCollector(registry=r)
        if GC_COLLECTOR is not None:
            GCCollector(registry=r)
        self.build = Info("stream_cl_build", "The running stream_cl build (one series, value 1).", registry=r)
        self.build.info(build_info())
        self.samples = Counter("stream_cl_samples", "Samples consumed, by outcome.", ["outcome"], registry=r)
        for outcome in ("learned", "held_out", "invalid", "unlabeled"):
            self.samples.labels(outcome=outcome)
        self.consumer_lag = Gauge(
            "stream_cl_consumer_lag", "Messages behind the partition's end offset.", ["partition"], registry=r
        )
        self.task_boundaries = Counter(
            "stream_cl_task_boundaries", "Task boundaries detected, by evidence.", ["reason"], registry=r
        )
        for reason in ("explicit", "new_class", "drift"):
            self.task_boundaries.labels(reason=reason)
        self.current_task = MeasuredGauge("stream_cl_current_task", "Index of the current task.", registry=r)
        self.tasks_seen = Gauge("stream_cl_tasks_seen", "Distinct tasks seen so far.", registry=r)
        self.classes_seen = Gauge("stream_cl_classes_seen", "Distinct labels seen so far.", registry=r)
        self.task_accuracy = Gauge(
            "stream_cl_task_accuracy",
            "Latest accuracy on the task's held-out reservoir.",
            ["task"],
            registry=r,
        )
        self.task_forgetting = Gauge(
            "stream_cl_task_forgetting",
            "Max-based forgetting of the task: max_{l<T} R[l][j] - R[T][j].",
            ["task"],
            registry=r,
        )
        self.task_forgetting_first_last = Gauge(
            "stream_cl_task_forgetting_first_last",
            "First-vs-last forgetting of the task: R[j][j] - R[T][j].",
            ["task"],
            registry=r,
        )
        self.stability_gap = MeasuredGauge(
            "stream_cl_stability_gap",
            "Largest drop of an old task's accuracy just after the latest boundary.",
            registry=r,
        )
        self.accuracy_matrix = Gauge(
            "stream_cl_accuracy_matrix",
            "R[i][j]: accuracy on task j after training up to task i (most recent 16 tasks).",
            ["after_task", "task"],
            registry=r,
        )
        self.evaluations = Counter(
            "stream_cl_evaluations", "Held-out evaluations of the served model.", registry=r
        )
        self.average_accuracy = MeasuredGauge(
            "stream_cl_average_accuracy", "Mean over tasks of the latest held-out accuracy.", registry=r
        )
        self.average_forgetting = MeasuredGauge(
            "stream_cl_average_forgetting", "Mean max-based forgetting over earlier tasks.", registry=r
        )
        self.backward_transfer = MeasuredGauge(
            "stream_cl_backward_transfer",
            "BWT (Lopez-Paz): mean of R[T][j] - R[j][j] over j < T.",
            registry=r,
        )
        self.prequential_accuracy = MeasuredGauge(
            "stream_cl_prequential_accuracy",
            "Rolling test-then-train accuracy over the last learner.prequential_window labeled samples.",
            registry=r,
        )
        self.learn_step_seconds = Histogram(
            "stream_cl_learn_step_seconds", "Time of one learner step.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.predict_seconds = Histogram(
            "stream_cl_predict_seconds",
            "Time to answer one prediction request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter("stream_cl_predictions", "Samples predicted over the socket.", registry=r)
        self.model_version = MeasuredGauge(
            "stream_cl_model_version", "Version of the served snapshot.", registry=r
        )
        self.last_checkpoint = MeasuredGauge(
            "stream_cl_last_checkpoint_timestamp_seconds", "When the last checkpoint was written.", registry=r
        )
        self.checkpoint_failures = Counter(
            "stream_cl_checkpoint_failures",
            "Checkpoint writes that failed (disk full, unwritable dir).",
            registry=r,
        )
        self.source_errors = Counter(
            "stream_cl_source_errors", "Kafka poll or commit errors (retried), by kind.", ["kind"], registry=r
        )
        self.dead_letters = Counter(
            "stream_cl_dead_letters",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for kind in SOURCE_ERROR_KINDS:
            self.source_errors.labels(kind=kind)
        self.free_capacity_ratio = MeasuredGauge(
            "stream_cl_free_capacity_ratio",
            "Fraction of protected neurons no task owns yet (strategies with finite capacity: eidetic).",
            registry=r,
        )
        self.capacity_exhausted = MeasuredGauge(
            "stream_cl_capacity_exhausted",
            "1 when no free neuron reaches the head (strategies with finite capacity: eidetic).",
            registry=r,
        )
        self._task_labels: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def task_label(self, task: object) -> str | None:
        """Admit `task` as a label value, dropping the oldest task's series beyond the cap."""
        label = str(task)
        with self._lock:
            if label in self._task_labels:
                self._task_labels.move_to_end(label)
                return label
            self._task_labels[label] = None
            while len(self._task_labels) > self.max_task_labels:
                old, _ = self._task_labels.popitem(last=False)
                for gauge in (self.task_accuracy, self.task_forgetting, self.task_forgetting_first_last):
                    with contextlib.suppress(KeyError):
                        gauge.remove(old)
            return label

    def sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


def start_metrics_server(metrics: Metrics, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve `/metrics` for `metrics.registry`; returns the server and the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, server.server_port
