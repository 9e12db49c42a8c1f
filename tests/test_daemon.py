"""The daemon end to end on the real embedded broker: learn, serve, scrape, dead-letter, shut down."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from support import kafka_overrides, wait_until

from stream_cl.config import Config, load_config
from stream_cl.runtime.daemon import Daemon
from stream_cl.serve.client import PredictionClient
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import BenchmarkStream, load_stream
from stream_cl.tools.producer import consume_all, produce_stream

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 4000  # permuted-mnist task 0: plain MNIST-5k, all ten classes


@pytest.fixture(scope="module")
def mnist() -> BenchmarkStream:
    return load_stream("permuted-mnist", seed=0)


@pytest.fixture(scope="module")
def running(
    broker: EmbeddedBroker, mnist: BenchmarkStream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, str]]:
    """A daemon learning task 0 of permuted-mnist, with three malformed messages in the middle."""
    topic = f"e2e-{os.getpid()}-{time.monotonic_ns()}"
    broker.create_topic(topic)
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.port=0",
            "model.hidden=[128]",
            "learner.snapshot_every_steps=5",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path_factory.mktemp('ckpt')}",
        ],
        env={},
    )
    daemon = Daemon(config)
    daemon.start()
    produce_stream(broker.bootstrap_servers, topic, mnist, limit=N_TRAIN // 2)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    producer.send(topic, b"\xc1 definitely not msgpack")
    producer.send(topic, msgpack.packb({"x": [0.0] * 10, "y": 1}))  # wrong length
    producer.send(topic, msgpack.packb({"x": np.full(784, np.nan, "<f4").tobytes(), "y": 1}))
    producer.flush()
    producer.close()
    # the second half: produce_stream numbers ids from 0, which is fine for this test
    produce_stream(broker.bootstrap_servers, topic, mnist, limit=N_TRAIN)
    yield daemon, topic
    daemon.stop()


def test_stream_is_learned(running: tuple[Daemon, str]) -> None:
    """Every valid produced sample is learned; the three malformed ones are counted invalid."""
    daemon, _ = running
    total_valid = N_TRAIN // 2 + N_TRAIN
    wait_until(lambda: daemon.learner.stats()["learned"] >= total_valid, 120, "all samples learned")
    assert daemon.learner.stats()["learned"] == total_valid
    assert daemon.metrics.sample_value("stream_cl_samples_total", {"outcome": "learned"}) == total_valid
    assert daemon.metrics.sample_value("stream_cl_samples_total", {"outcome": "invalid"}) == 3
    assert daemon.failed is None


def test_malformed_messages_reach_dead_letter_topic(
    broker: EmbeddedBroker, running: tuple[Daemon, str]
) -> None:
    """Each malformed message lands in the dead-letter topic with its original bytes and reason."""
    daemon, topic = running
    wait_until(lambda: daemon.source.dead_lettered >= 3, 60, "three dead letters")
    dlq = f"{topic}.dlq"
    wait_until(
        lambda: len(consume_all(broker.bootstrap_servers, dlq, timeout_s=5)) >= 3,
        30,
        "three dead letters in the topic",
    )
    records = consume_all(broker.bootstrap_servers, dlq, timeout_s=5)
    reasons = sorted(dict(r.headers)["stream_cl.reason"].decode() for r in records)
    assert reasons == ["bad_length", "not_finite", "not_msgpack"]
    originals = {r.value for r in records}
    assert b"\xc1 definitely not msgpack" in originals
    sources = [dict(r.headers)["stream_cl.source"].decode() for r in records]
    assert all(s.startswith(f"{topic}:0:") for s in sources)


def test_socket_predictions_beat_chance(running: tuple[Daemon, str], mnist: BenchmarkStream) -> None:
    """Held-out predictions over the socket are far above chance (10%) and carry model_version."""
    daemon, _ = running
    wait_until(lambda: daemon.learner.stats()["learned"] >= N_TRAIN * 3 // 2, 120, "learning")
    daemon.wait_idle()
    task0 = mnist.tasks[0]
    assert daemon.serve_port is not None
    with PredictionClient("127.0.0.1", daemon.serve_port) as client:
        labels = []
        for start in (0, 200):  # 200 MNIST samples per frame stay under serve.max_frame_bytes
            reply = client.predict_batch(task0.test_x[start : start + 200])
            labels += [r["label"] for r in reply["results"]]
        acc = float(np.mean(np.asarray(labels) == task0.test_y[:400]))
        assert acc > 0.6, acc
        one = client.predict(task0.test_x[0])
        assert one["ok"] and one["model_version"] >= 1
        assert set(one["proba"]) == set(range(10))


def test_the_learner_thread_flushes_subnormal_floats(running: tuple[Daemon, str]) -> None:
    """The learner thread trains with subnormals flushed (see `strategies.flush_denormals`); a task
    queued for it runs there, in stream order, and sees the mode."""
    from stream_cl.runtime.tuning import flushes_denormals

    daemon, _ = running
    seen: list[bool] = []
    daemon.queue.put(lambda: seen.append(flushes_denormals()))
    wait_until(lambda: seen, 60, "the learner thread to run the probe")
    assert seen == [True]
    assert not flushes_denormals()  # this (the test's) thread keeps its mode


def test_model_version_increases_while_learning(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Replies made while the daemon learns carry non-decreasing, eventually increasing versions."""
    topic = f"versions-{time.monotonic_ns()}"
    broker.create_topic(topic)
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.enabled=false",
            "model.hidden=[64]",
            "learner.snapshot_every_steps=2",
            f"checkpoint.dir={tmp_path}",
        ],
        env={},
    )
    stream = load_stream("split-digits", seed=0)
    daemon = Daemon(config)
    daemon.start()
    try:
        produce_stream(broker.bootstrap_servers, topic, stream, limit=200)
        wait_until(lambda: daemon.holder.get() is not None, 60, "a first snapshot")
        assert daemon.serve_port is not None
        versions = []
        with PredictionClient("127.0.0.1", daemon.serve_port) as client:
            first = client.predict(stream.tasks[0].test_x[0])["model_version"]
            produce_stream(broker.bootstrap_servers, topic, stream, limit=stream.n_train)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                versions.append(client.predict(stream.tasks[0].test_x[0])["model_version"])
                if versions[-1] > first + 5:
                    break
                time.sleep(0.01)
        assert versions == sorted(versions)
        assert versions[-1] > first
    finally:
        daemon.stop()


def _small_daemon_config(broker: EmbeddedBroker, tmp_path: Path, *overrides: str) -> tuple[Config, str]:
    """A small model on a fresh topic, without serving or /metrics."""
    topic = f"small-{time.monotonic_ns()}"
    broker.create_topic(topic)
    sets = [
        *kafka_overrides(broker.bootstrap_servers, topic),
        "serve.enabled=false",
        "metrics.enabled=false",
        "model.hidden=[16]",
        f"checkpoint.dir={tmp_path}",
        *overrides,
    ]
    return load_config(None, sets, env={}), topic


def test_the_heap_is_frozen_and_the_gil_switch_interval_set_while_running(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """`start` collects once and freezes what is alive (no full collection scans it while the
    stream is learned); `stop` unfreezes, so cycles among those objects can be collected again.
    The GIL switch interval is `learner.gil_switch_interval_us` while it runs, Python's again after."""
    config, topic = _small_daemon_config(broker, tmp_path, "learner.gil_switch_interval_us=70")
    before = sys.getswitchinterval()
    daemon = Daemon(config)
    daemon.start()
    try:
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(70e-6)
        produce_stream(broker.bootstrap_servers, topic, load_stream("split-digits", seed=0), limit=100)
        wait_until(lambda: daemon.learner.stats()["learned"] > 0, 60, "learning")
        assert gc.get_freeze_count() > 0
    finally:
        daemon.stop()
    assert gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == before


def test_daemons_in_one_process_share_the_switch_interval_until_the_last_stops() -> None:
    """The interval is the latest running daemon's; each stop hands it back to the one before."""
    from stream_cl.runtime.tuning import SwitchInterval as _SwitchInterval

    before = sys.getswitchinterval()  # Python's, or a daemon's that another test keeps running
    _SwitchInterval.hold(50e-6)
    _SwitchInterval.hold(60e-6)
    assert sys.getswitchinterval() == pytest.approx(60e-6)
    _SwitchInterval.release(60e-6)
    assert sys.getswitchinterval() == pytest.approx(50e-6)  # the first daemon still runs
    _SwitchInterval.release(50e-6)
    assert sys.getswitchinterval() == before


def _cpus_of(tid: int | None) -> frozenset[int]:
    assert tid is not None, "the thread runs"
    return frozenset(os.sched_getaffinity(tid))


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores (Linux)"
)
def test_cpu_affinity_puts_the_learner_on_its_own_core_and_the_rest_elsewhere(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """`learner.cpu_affinity`: the learner thread on its core, the source and evaluator threads and
    the fetcher process on the others; the thread that called `start` keeps its cores. Learning
    works pinned. (The core is named: with `auto` a daemon another test keeps running may hold
    the last one; test_affinity.py covers how `auto` picks.)"""
    allowed = frozenset(os.sched_getaffinity(0))
    last = max(allowed)
    config, topic = _small_daemon_config(broker, tmp_path, f"learner.cpu_affinity={last}")
    daemon = Daemon(config)
    daemon.start()
    try:
        assert frozenset(os.sched_getaffinity(0)) == allowed
        produce_stream(broker.bootstrap_servers, topic, load_stream("split-digits", seed=0), limit=200)
        wait_until(lambda: daemon.learner.stats()["learned"] > 0, 60, "learning")
        assert daemon.learner.evaluator is not None
        evaluator = daemon.learner.evaluator._thread
        assert evaluator is not None  # the daemon's own threads: other tests' daemons may run too
        assert _cpus_of(daemon._learner_thread.native_id) == {last}
        for thread in (daemon._source_thread, evaluator):
            assert _cpus_of(thread.native_id) == allowed - {last}, thread.name
        assert config.kafka.fetch_in_subprocess
        fetcher = daemon.source.pid  # type: ignore[attr-defined]
        assert fetcher is not None and _cpus_of(fetcher) == allowed - {last}
    finally:
        daemon.stop()


def test_a_default_daemon_pins_nothing_and_writes_nothing_to_the_temp_directory(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Defaults are safe on a shared host: no CPU pinning, Python's own switch interval, and
    nothing written to the temp directory (pinning's core claims live under checkpoint.dir)."""
    defaults = Config().learner
    assert defaults.cpu_affinity == "off" and defaults.gil_switch_interval_us == 0
    temp = Path(tempfile.gettempdir())
    before = set(temp.iterdir())
    switch_before = sys.getswitchinterval()
    config, topic = _small_daemon_config(broker, tmp_path)
    daemon = Daemon(config)
    daemon.start()
    try:
        assert sys.getswitchinterval() == switch_before
        produce_stream(broker.bootstrap_servers, topic, load_stream("split-digits", seed=0), limit=100)
        wait_until(lambda: daemon.learning.stats()["learned"] > 0, 60, "learning")
        assert _cpus_of(daemon._learner_thread.native_id) == frozenset(os.sched_getaffinity(0))
    finally:
        daemon.stop()
    created = sorted(p.name for p in set(temp.iterdir()) - before if not p.name.startswith("pytest-"))
    assert created == []


def test_cpu_affinity_off_leaves_every_thread_where_it_was(broker: EmbeddedBroker, tmp_path: Path) -> None:
    config, topic = _small_daemon_config(broker, tmp_path, "learner.cpu_affinity=off")
    daemon = Daemon(config)
    daemon.start()
    try:
        produce_stream(broker.bootstrap_servers, topic, load_stream("split-digits", seed=0), limit=100)
        wait_until(lambda: daemon.learner.stats()["learned"] > 0, 60, "learning")
        assert _cpus_of(daemon._learner_thread.native_id) == frozenset(os.sched_getaffinity(0))
    finally:
        daemon.stop()


def test_metrics_endpoint_serves_the_design_series(running: tuple[Daemon, str]) -> None:
    """A real HTTP scrape of /metrics returns the docs/metrics.md series with live values."""
    daemon, _ = running
    wait_until(lambda: daemon.learner.stats()["learned"] >= N_TRAIN, 120, "learning")
    time.sleep(1.2)  # lag is refreshed every second
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    )
    for series in (
        'stream_cl_samples_total{outcome="learned"}',
        'stream_cl_samples_total{outcome="invalid"}',
        'stream_cl_consumer_lag{partition="0"}',
        "stream_cl_prequential_accuracy",
        "stream_cl_learn_step_seconds_bucket",
        "stream_cl_predict_seconds_bucket",
        "stream_cl_predictions_total",
        "stream_cl_model_version",
        "stream_cl_classes_seen 10.0",
    ):
        assert series in body, series
    preq = daemon.metrics.sample_value("stream_cl_prequential_accuracy")
    assert preq is not None and preq > 0.5


def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


def test_sigterm_commits_offsets_and_exits_zero(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """SIGTERM: the daemon process exits 0 with every processed offset committed; the group re-reads nothing."""
    topic = f"sigterm-{time.monotonic_ns()}"
    group = f"g-{topic}"
    broker.create_topic(topic)
    stream = load_stream("split-digits", seed=0)
    n = produce_stream(broker.bootstrap_servers, topic, stream)
    env = {**os.environ, "STREAM_CL_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_cl.cli",
            "run",
            "--set",
            f"kafka.topic={topic}",
            "--set",
            f"kafka.group_id={group}",
            "--set",
            "kafka.commit_interval_s=3600",  # only the shutdown commit can commit
            "--set",
            "evaluation.holdout_fraction=0",
            "--set",
            "serve.port=0",
            "--set",
            "metrics.port=0",
            "--set",
            "log.format=json",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics_port = None
        assert proc.stderr is not None
        for line in proc.stderr:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "daemon_started":
                metrics_port = event["metrics_port"]
                break
        assert metrics_port, "daemon_started was never logged"
        # keep draining the log so a full pipe can never block the daemon
        threading.Thread(target=proc.stderr.read, daemon=True).start()

        def learned() -> float:
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
            line = next(
                x for x in body.splitlines() if x.startswith('stream_cl_samples_total{outcome="learned"}')
            )
            return float(line.split()[-1])

        wait_until(lambda: learned() >= n, 120, "the subprocess daemon to learn the stream")
        assert _committed(broker.bootstrap_servers, group, topic) in (None, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _committed(broker.bootstrap_servers, group, topic) == n
    again = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=10_000,
        session_timeout_ms=10_000,
    )
    try:
        reread = 0
        deadline = time.monotonic() + 30
        while not again.assignment() and time.monotonic() < deadline:
            reread += sum(len(v) for v in again.poll(timeout_ms=250).values())
        assert again.assignment(), "the second consumer never joined the group"
        for _ in range(8):  # assigned: anything uncommitted would be fetched now
            reread += sum(len(v) for v in again.poll(timeout_ms=250).values())
    finally:
        again.close()
    assert reread == 0


def test_every_malformed_class_is_dead_lettered_with_its_reason(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """One message per malformed class reaches the dead-letter topic with that reason; valid ones are learned."""
    topic = f"dlq-classes-{time.monotonic_ns()}"
    broker.create_topic(topic)
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.enabled=false",
            "metrics.enabled=false",
            "model.input_dim=4",
            "model.hidden=[8]",
            "model.max_classes=2",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path}",
        ],
        env={},
    )
    good = [msgpack.packb({"x": [0.1, 0.2, 0.3, 0.4], "y": i % 2}) for i in range(6)]
    bad = {
        "not_msgpack": b"\xc1\xc1",
        "not_a_map": msgpack.packb([1, 2, 3]),
        "missing_x": msgpack.packb({"y": 1}),
        "bad_length": msgpack.packb({"x": [0.1, 0.2], "y": 1}),
        "bad_type": msgpack.packb({"x": "four floats", "y": 1}),
        "bad_shape": msgpack.packb({"x": [0.1, 0.2, 0.3, 0.4], "shape": [3], "y": 1}),
        "not_finite": msgpack.packb({"x": [0.1, float("inf"), 0.3, 0.4], "y": 1}),
        "too_many_classes": msgpack.packb({"x": [0.1, 0.2, 0.3, 0.4], "y": 7}),
    }
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    for value in [*good[:3], *bad.values(), *good[3:]]:
        producer.send(topic, value)
    producer.flush()
    producer.close()
    daemon = Daemon(config)
    daemon.start()
    try:
        dlq = f"{topic}.dlq"
        wait_until(
            lambda: len(consume_all(broker.bootstrap_servers, dlq, timeout_s=5)) >= len(bad),
            60,
            "dead letters",
        )
        wait_until(lambda: daemon.learner.stats()["learned"] >= len(good), 30, "the valid samples")
        records = consume_all(broker.bootstrap_servers, dlq, timeout_s=5)
        reasons = {dict(r.headers)["stream_cl.reason"].decode(): r.value for r in records}
        assert reasons == bad  # every reason, each with its original bytes
        assert daemon.learner.stats()["learned"] == len(good)
        assert daemon.failed is None
    finally:
        daemon.stop()
