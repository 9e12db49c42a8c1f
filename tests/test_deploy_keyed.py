"""The shipped dashboard and alerts on a per-key deployment (`models.per_key`, as the scale-out
stacks in deploy/ run): a real Prometheus scrapes a daemon learning several keys, several tasks
each, and every panel and alert expression returns data or is correctly empty."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
from kafka import KafkaProducer
from support import kafka_overrides, wait_until
from test_deploy import (
    CAPACITY_ONLY,
    Live,
    _api,
    _start_prometheus,
    _tool,
    alert_rules,
    always_answering,
    check_dashboard_queries,
    metric_names,
    stop_process,
)

from stream_cl.config import load_config
from stream_cl.ingest.codec import encode_sample
from stream_cl.runtime.daemon import Daemon
from stream_cl.serve.client import PredictionClient
from stream_cl.tools.broker import EmbeddedBroker

KEYS = ["site-a", "site-b", "site-c"]
DIM = 16
TASKS = (("t0", (0, 1)), ("t1", (2, 3)), ("t2", (4, 5)))
PER_TASK = 150  # samples per key and task

# Correctly empty on a per-key learner without replicas:
SINGLE_MODEL_ONLY = {  # per-task series: a per-key daemon exports them per model (stream_cl_model_*)
    "stream_cl_task_accuracy",
    "stream_cl_task_forgetting",
    "stream_cl_task_forgetting_first_last",
    "stream_cl_accuracy_matrix",
}
REPLICAS_ONLY = {  # no publish.topic, no replica here
    "stream_cl_snapshots_published_total",
    "stream_cl_snapshot_publish_failures_total",
    "stream_cl_replica_snapshots_applied_total",
    "stream_cl_replica_snapshots_rejected_total",
    "stream_cl_replica_snapshot_age_seconds",
    "stream_cl_replica_last_applied_timestamp_seconds",
}
ABSENT_HERE = SINGLE_MODEL_ONLY | REPLICAS_ONLY | CAPACITY_ONLY  # the strategy is replay: no capacity


def _x(y: int, rng: np.random.Generator) -> np.ndarray:
    centre = np.zeros(DIM, np.float32)
    centre[y] = 3.0
    return (centre + rng.normal(0.0, 0.5, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def keyed_live(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus_binary = _tool("prometheus")
    topic = f"deploy-keyed-{os.getpid()}-{time.monotonic_ns()}"
    broker.create_topic(topic, partitions=len(KEYS))
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.port=0",
            "models.per_key=true",
            "model.hidden=[32]",
            "model.batch_size=8",
            "strategy.name=replay",
            "evaluation.holdout_fraction=0.15",
            "evaluation.every_samples=50",
            "evaluation.every_s=1.0",
            "evaluation.max_cpu_share=1.0",
            "checkpoint.every_samples=100",
            f"checkpoint.dir={tmp_path_factory.mktemp('ckpt')}",
        ],
        env={},
    )
    started = time.time()
    daemon = Daemon(config)
    daemon.start()
    assert daemon.metrics_port is not None and daemon.serve_port is not None
    proc, base = _start_prometheus(
        prometheus_binary, {"stream_cl": daemon.metrics_port}, tmp_path_factory.mktemp("prometheus")
    )
    try:
        wait_until(lambda: bool(daemon.source.assigned), 60, "the group join")
        state = Live(daemon, None, config, base, 0, started)  # type: ignore[arg-type]
        wait_until(lambda: bool(state.query("up == 1")), 30, "Prometheus's first scrape")
        rng = np.random.default_rng(0)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
        for task, labels in TASKS:  # every key moves through the same three tasks, while scraped
            for n in range(PER_TASK):
                for i, key in enumerate(KEYS):
                    y = labels[n % 2]
                    producer.send(
                        topic, encode_sample(_x(y, rng), y=y, task=task), key=key.encode(), partition=i
                    )
            producer.flush()
            time.sleep(2.0)
        producer.send(topic, b"\xc1 not msgpack", key=KEYS[0].encode(), partition=0)
        producer.flush()
        producer.close()
        keyed = daemon.keyed
        assert keyed is not None
        produced = len(TASKS) * PER_TASK * len(KEYS)
        wait_until(
            lambda: (
                (daemon.metrics.sample_value("stream_cl_samples_total", {"outcome": "learned"}) or 0)
                + (daemon.metrics.sample_value("stream_cl_samples_total", {"outcome": "held_out"}) or 0)
                >= produced
            ),
            60,
            "every sample learned or held out",
        )
        with PredictionClient("127.0.0.1", daemon.serve_port) as client:
            for key in KEYS:
                client.predict_batch(np.stack([_x(y, rng) for y in range(6)]), key=key)
        wait_until(
            lambda: bool(state.query(f"stream_cl_models_evaluated == {len(KEYS)}")), 60, "every model scored"
        )
        wait_until(lambda: bool(state.query("stream_cl_average_forgetting")), 60, "the aggregate forgetting")
        time.sleep(3)  # a few more scrapes, so every 5 s rate window has two points
        yield state
    finally:
        stop_process(proc)
        daemon.stop()


@pytest.mark.integration
def test_forgetting_is_visible_for_a_per_key_deployment(keyed_live: Live) -> None:
    """The aggregate accuracy and forgetting have data, and every model has its own series."""
    assert keyed_live.query("stream_cl_average_accuracy > 0")
    assert keyed_live.query("stream_cl_average_forgetting >= 0")
    models = {s["metric"]["model"] for s in keyed_live.query("stream_cl_model_average_forgetting")}
    assert models == set(KEYS)
    cells = {
        (s["metric"]["after_task"], s["metric"]["task"])
        for s in keyed_live.query(f'stream_cl_model_accuracy_matrix{{model="{KEYS[0]}"}}')
    }
    assert {("t0", "t0"), ("t1", "t0"), ("t1", "t1")} <= cells


@pytest.mark.integration
def test_every_dashboard_query_returns_data_or_is_correctly_empty_per_key(keyed_live: Live) -> None:
    """Each panel, sent as Grafana sends it, has data unless its series cannot exist on this stack."""
    assert check_dashboard_queries(keyed_live, ABSENT_HERE), "the correctly empty panels were found"


@pytest.mark.integration
def test_every_alert_expression_evaluates_on_a_per_key_daemon(keyed_live: Live) -> None:
    """Each rule is healthy and, compared with `bool`, returns data unless its series cannot exist here."""
    rules = {r["name"]: r for g in _api(keyed_live.prometheus, "rules")["groups"] for r in g["rules"]}
    silent = []
    for rule in alert_rules():
        assert rules[rule["alert"]]["health"] == "ok", rule["alert"]
        answered = keyed_live.query(always_answering(rule["expr"]))
        if metric_names(rule["expr"]) & ABSENT_HERE and not metric_names(rule["expr"]) - ABSENT_HERE - {"up"}:
            assert not answered, rule["alert"]
        elif not answered and not metric_names(rule["expr"]) & ABSENT_HERE:
            silent.append(rule["alert"])
    assert not silent, f"alert expressions that can never fire on a per-key daemon: {silent}"
