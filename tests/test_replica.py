"""Prediction replicas: the learner publishes snapshots to Kafka, `serve --follow` replicas serve them.

The end-to-end tests run on the session's real broker: a daemon learns split-digits while a
follower replica (started before the snapshot topic even exists) serves the same socket protocol;
a late `stream-cl serve --follow` process joins after learning. The wire format is also checked
without a broker, for every registered strategy: a published snapshot rebuilds to bit-identical
predictions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest
from kafka import KafkaProducer
from support import free_port, kafka_overrides, wait_until

from stream_cl.config import Config, ConfigError, load_config
from stream_cl.ingest.codec import Sample
from stream_cl.ingest.source import Record
from stream_cl.learn.learner import Learner
from stream_cl.learn.outputs import LearnerOutputs
from stream_cl.metrics import Metrics
from stream_cl.replicate.snapshots import SnapshotFollower, SnapshotPublisher, capture_learner
from stream_cl.replicate.wire import Assembler, SnapshotRejected, encode, rebuild
from stream_cl.runtime.daemon import Daemon
from stream_cl.runtime.replica import Replica
from stream_cl.serve.client import PredictionClient, PredictionError
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
from stream_cl.strategies import available
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import BenchmarkStream, load_stream
from stream_cl.tools.producer import produce_stream

ROOT = Path(__file__).resolve().parents[1]
INTERVAL_S = 0.5
# A replica must serve every learner version within this long of its publish: one interval for the
# capture, one for the send, and time to ship, verify and rebuild on a loaded 2-core machine.
CATCH_UP_S = 2 * INTERVAL_S + 5.0


@pytest.fixture(scope="module")
def digits() -> BenchmarkStream:
    return load_stream("split-digits", seed=0)


def _records(stream: BenchmarkStream, start: int = 0, limit: int | None = None) -> list[Record]:
    out = []
    for x, y, task, index in stream.iter_samples():
        if index < start:
            continue
        if limit is not None and index >= start + limit:
            break
        sample = Sample(x=np.asarray(x, np.float32).reshape(-1), y=y, task=task, shape=stream.input_shape)
        out.append(Record(partition=0, offset=index, sample=sample, raw=b""))
    return out


def _learner_config(*overrides: str) -> Config:
    return load_config(
        None,
        [
            "model.hidden=[32]",
            "model.batch_size=16",
            "evaluation.holdout_fraction=0",
            "checkpoint.enabled=false",
            "serve.http_port=0",
            *overrides,
        ],
        env={},
    )


# -- the wire format, no broker -------------------------------------------------------------------
def _assemble(messages: list[tuple[bytes, bytes]], max_bytes: int = 1 << 30) -> object:
    assembler = Assembler(max_bytes)
    done = [assembler.feed(value) for _, value in messages]
    assert all(d is None for d in done[:-1])
    return done[-1]


@pytest.mark.parametrize("strategy", available())
def test_published_snapshot_rebuilds_to_identical_predictions(strategy: str, digits: BenchmarkStream) -> None:
    """Every strategy: chunks + manifest reassemble, verify and rebuild to the learner's exact predictions and version."""
    config = _learner_config(f"strategy.name={strategy}")
    learner = Learner(config, SnapshotHolder(), Metrics())
    learner.process(_records(digits, limit=700))  # two tasks: a boundary, task ids, a grown head
    learner.flush()
    served = learner.holder.get()
    assert served is not None and len(served.tasks) >= 2
    capture = capture_learner("", learner, learner.version)
    assert capture is not None
    _, messages, size = encode(capture, config, chunk_bytes=4096)
    assert len(messages) - 1 == -(-size // 4096) > 1  # really chunked
    published = _assemble(messages)
    replica_config = load_config(None, ["model.hidden=[999]"], env={})  # [model] comes from the manifest
    rebuilt = rebuild(published, replica_config)  # type: ignore[arg-type]
    assert (rebuilt.version, rebuilt.labels, rebuilt.tasks, rebuilt.input_shape, rebuilt.strategy) == (
        served.version,
        served.labels,
        served.tasks,
        served.input_shape,
        served.strategy,
    )
    xs = np.concatenate([t.test_x[:40] for t in digits.tasks[:2]]).reshape(80, -1)
    for task in (None, *served.tasks):
        want, got = served.predict(xs, task), rebuilt.predict(xs, task)
        np.testing.assert_array_equal(got.proba, want.proba)
        assert list(got.tasks) == list(want.tasks)


def test_tampered_or_incomplete_snapshots_are_rejected(digits: BenchmarkStream) -> None:
    """A flipped byte, a missing chunk, an oversized publish or garbage never becomes a snapshot."""
    config = _learner_config()
    learner = Learner(config, SnapshotHolder(), Metrics())
    learner.process(_records(digits, limit=300))
    learner.flush()
    capture = capture_learner("", learner, learner.version)
    assert capture is not None
    _, messages, size = encode(capture, config, chunk_bytes=2048)

    def fed(values: list[bytes], max_bytes: int = 1 << 30) -> str:
        assembler = Assembler(max_bytes)
        try:
            for value in values:
                assembler.feed(value)
        except SnapshotRejected as e:
            return e.reason
        return "accepted"

    values = [v for _, v in messages]
    assert fed(values) == "accepted"
    chunk = msgpack.unpackb(values[1])
    chunk["data"] = bytes([chunk["data"][0] ^ 1]) + chunk["data"][1:]
    assert fed([values[0], msgpack.packb(chunk), *values[2:]]) == "bad_checksum"
    assert fed([values[0], *values[2:]]) == "missing_chunks"
    assert fed(values[-1:]) == "missing_chunks"  # a manifest whose chunks were never seen
    assert fed(values, max_bytes=size // 2) == "too_large"
    assert fed([b"\xc1"]) == "not_msgpack"
    assert fed([msgpack.packb({"kind": "nope", "model": ""})]) == "bad_message"


def test_follower_exports_when_it_last_applied_a_snapshot(digits: BenchmarkStream) -> None:
    """`stream_cl_replica_last_applied_timestamp_seconds` is absent before the first load, then its Unix time."""
    config = _learner_config()
    learner = Learner(config, SnapshotHolder(), Metrics())
    learner.process(_records(digits, limit=300))
    learner.flush()
    capture = capture_learner("", learner, learner.version)
    assert capture is not None
    _, messages, _ = encode(capture, config, chunk_bytes=1 << 20)
    metrics = Metrics()
    follower = SnapshotFollower(config, "unused", SnapshotRegistry(keyed=False), metrics)  # never started
    name = "stream_cl_replica_last_applied_timestamp_seconds"
    assert metrics.sample_value(name) is None  # not 0: "applied at 1970" would page as stale
    for version in (1, 2):
        before = time.time()
        follower._latest[""] = _assemble(messages)  # type: ignore[assignment]
        follower._apply_latest()
        applied_at = metrics.sample_value(name)
        assert applied_at is not None and before <= applied_at <= time.time(), version
        assert metrics.sample_value("stream_cl_replica_snapshots_applied_total") == version


def test_publish_config_is_checked() -> None:
    """Bad [publish] values are one error naming the key; `serve` without a topic is a usage error."""
    with pytest.raises(ConfigError, match="publish.interval_s"):
        load_config(None, ["publish.interval_s=-1"], env={})
    with pytest.raises(ConfigError, match="publish.chunk_bytes"):
        load_config(None, ["publish.chunk_bytes=0"], env={})
    result = subprocess.run(
        [sys.executable, "-m", "stream_cl.cli", "serve", "--set", "publish.topic="],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2 and "publish.topic" in result.stderr


# -- a learner and a follower on the real broker -------------------------------------------------
@dataclass
class Following:
    daemon: Daemon
    replica: Replica
    config: Config
    snapshot_topic: str
    stream: BenchmarkStream
    # (monotonic time, version) as each side served it, sampled every 20 ms while learning
    learner_versions: list[tuple[float, int]] = field(default_factory=list)
    replica_versions: list[tuple[float, int]] = field(default_factory=list)


def _version(snapshot: Snapshot | None) -> int | None:
    return None if snapshot is None else snapshot.version


@pytest.fixture(scope="module")
def following(
    broker: EmbeddedBroker, digits: BenchmarkStream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Following]:
    """A daemon learns split-digits at ~300 samples/s and publishes; a replica started first follows it."""
    topic = f"replica-{os.getpid()}-{time.monotonic_ns()}"
    broker.create_topic(topic)
    snapshot_topic = f"{topic}.snapshots"
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.port=0",
            "model.hidden=[64]",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path_factory.mktemp('ckpt')}",
            f"publish.topic={snapshot_topic}",
            f"publish.interval_s={INTERVAL_S}",
            "publish.chunk_bytes=16384",  # several chunks per snapshot over the real broker
        ],
        env={},
    )
    replica = Replica(config, snapshot_topic)  # before the topic exists: it waits for it
    replica.start()
    daemon = Daemon(config)
    state = Following(daemon, replica, config, snapshot_topic, digits)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            now = time.monotonic()
            for versions, v in (
                (state.learner_versions, _version(daemon.holder.get())),
                (state.replica_versions, _version(replica.registry.get())),
            ):
                if v is not None and (not versions or versions[-1][1] != v):
                    versions.append((now, v))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        daemon.start()
        sampler.start()
        wait_until(lambda: bool(daemon.source.assigned), 60, "the group join")
        produce_stream(broker.bootstrap_servers, topic, digits, rate=300)  # ~5 s: many intervals
        wait_until(lambda: daemon.learner.stats()["learned"] >= digits.n_train, 120, "every sample learned")
        assert daemon.wait_idle(30)
        wait_until(
            lambda: _version(replica.registry.get()) == _version(daemon.holder.get()),
            CATCH_UP_S + 10,
            "the replica to serve the learner's final version",
        )
        time.sleep(0.2)
        sampling.set()
        sampler.join()
        yield state
    finally:
        sampling.set()
        daemon.stop()
        replica.stop()


def test_follower_catches_up_within_a_bounded_delay_after_each_publish(following: Following) -> None:
    """Every learner version is matched or passed by the replica within CATCH_UP_S; the final one exactly."""
    learner, replica = following.learner_versions, following.replica_versions
    assert len(learner) > 10 and len(replica) >= 3, (learner, replica)
    assert [v for _, v in replica] == sorted(v for _, v in replica), "the replica went back in versions"
    assert {v for _, v in replica} <= set(range(1, learner[-1][1] + 1))
    delays = []
    for published_at, version in learner:
        caught = next((t for t, v in replica if v >= version), None)
        assert caught is not None, f"version {version} never reached the replica"
        delays.append(caught - published_at)
    assert max(delays) <= CATCH_UP_S, f"worst catch-up {max(delays):.2f}s > {CATCH_UP_S}s"
    assert replica[-1][1] == learner[-1][1] == following.daemon.learner.version
    published = following.daemon.metrics.sample_value("stream_cl_snapshots_published_total")
    assert published is not None and 3 <= published < len(learner)  # rate-limited, not one per publish


def test_follower_predicts_what_the_learner_predicts(following: Following) -> None:
    """Same inputs, same version: the replica's socket answers exactly as the learner's own socket."""
    xs = np.concatenate([t.test_x[:30] for t in following.stream.tasks])
    assert following.daemon.serve_port and following.replica.serve_port
    with (
        PredictionClient("127.0.0.1", following.daemon.serve_port) as learner,
        PredictionClient("127.0.0.1", following.replica.serve_port) as replica,
    ):
        want, got = learner.predict_batch(xs), replica.predict_batch(xs)
        assert got["model_version"] == want["model_version"] == following.daemon.learner.version
        assert [r["label"] for r in got["results"]] == [r["label"] for r in want["results"]]
        for a, b in zip(got["results"], want["results"], strict=True):
            assert a["proba"] == pytest.approx(b["proba"], abs=1e-6)
        task = following.stream.tasks[1].task_id
        hinted = replica.predict(xs[0], task=task)
        assert hinted == {**learner.predict(xs[0], task=task), "id": hinted["id"]}
        info_l, info_r = learner.info(), replica.info()
        assert {k: v for k, v in info_r.items() if k != "id"} == {
            k: v for k, v in info_l.items() if k != "id"
        }
        assert replica.health()["status"] == "ready"
    assert (
        following.replica.metrics.sample_value("stream_cl_model_version") == following.daemon.learner.version
    )


def test_cli_replica_joining_late_loads_only_the_latest_snapshot(following: Following) -> None:
    """`stream-cl serve --follow` started after learning serves the final version at once, then exits 0 on SIGTERM."""
    serve_port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_cl.cli",
            "serve",
            "--follow",
            following.snapshot_topic,
            "--set",
            f"kafka.bootstrap_servers={following.config.kafka.bootstrap_servers}",
            "--set",
            f"serve.port={serve_port}",
            "--set",
            f"metrics.port={metrics_port}",
            "--set",
            "log.format=json",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def served_version() -> int | None:
            try:
                with PredictionClient("127.0.0.1", serve_port, timeout=2) as client:
                    return int(client.info()["model_version"])
            except (OSError, PredictionError):
                return None

        wait_until(lambda: served_version() is not None, 90, "the CLI replica to serve")
        assert served_version() == following.daemon.learner.version
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        # the backlog holds several snapshots; a late joiner loads only the newest one
        assert "stream_cl_replica_snapshots_applied_total 1.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_garbage_on_the_snapshot_topic_is_counted_and_ignored(following: Following) -> None:
    """Foreign or broken messages on the snapshot topic are counted by reason; serving goes on unchanged."""
    before = following.replica.registry.get()
    producer = KafkaProducer(bootstrap_servers=following.config.kafka.bootstrap_servers)
    producer.send(following.snapshot_topic, key=b"x", value=b"\xc1 not msgpack")
    manifest = {"kind": "manifest", "format": 1, "model": "", "publish_id": "none", "chunks": 1}
    producer.send(following.snapshot_topic, key=b"manifest/", value=msgpack.packb(manifest))
    producer.flush()
    producer.close()
    metrics = following.replica.metrics

    def rejected(reason: str) -> float:
        return metrics.sample_value("stream_cl_replica_snapshots_rejected_total", {"reason": reason}) or 0.0

    wait_until(
        lambda: rejected("not_msgpack") >= 1 and rejected("missing_chunks") >= 1, 30, "both rejections"
    )
    assert following.replica.registry.get() is before
    with PredictionClient("127.0.0.1", following.replica.serve_port or 0) as client:
        assert client.health()["status"] == "ready"


# -- one model per key ----------------------------------------------------------------------------
def test_keyed_replica_serves_every_published_key(broker: EmbeddedBroker, digits: BenchmarkStream) -> None:
    """Snapshots published per model key reach a keyed replica, each key with its own learner's version and predictions."""
    snapshot_topic = f"keyed-{os.getpid()}-{time.monotonic_ns()}.snapshots"
    config = _learner_config(
        f"kafka.bootstrap_servers={broker.bootstrap_servers}",
        f"publish.topic={snapshot_topic}",
        "publish.interval_s=60",  # only the first snapshot and the final capture go out
        "publish.partitions=2",
        "serve.port=0",
        "metrics.port=0",
    )
    metrics = Metrics()
    publisher = SnapshotPublisher(config, metrics)
    publisher.start()
    learners = {}
    for key, (start, limit) in {"site-a": (0, 300), "site-b": (300, 500)}.items():
        learner = Learner(
            config,
            SnapshotHolder(),
            Metrics(),
            LearnerOutputs(
                published=lambda _, lrn, snap, key=key: publisher.offer(key, lrn, snap, idle=False)
            ),
        )
        learner.process(_records(digits, start, limit))
        learner.flush()
        learners[key] = learner
    publisher.capture_uncaptured()
    publisher.close()
    assert publisher.sent >= 4  # per key: the first snapshot, each boundary (at once), the final one
    replica = Replica(config, snapshot_topic, keyed=True)
    replica.start()
    try:
        wait_until(
            lambda: all(_version(replica.registry.get(k)) == lrn.version for k, lrn in learners.items()),
            60,
            "both keys at their learner's version",
        )
        xs = digits.tasks[0].test_x[:20]
        assert replica.serve_port
        with PredictionClient("127.0.0.1", replica.serve_port) as client:
            for key, learner in learners.items():
                reply = client.predict_batch(xs, key=key)
                snap = learner.holder.get()
                assert snap is not None and reply["model_version"] == snap.version
                want = snap.predict(xs.reshape(len(xs), -1))
                assert [r["label"] for r in reply["results"]] == [
                    snap.labels[i] for i in want.proba.argmax(1)
                ]
            with pytest.raises(PredictionError, match="not_ready"):
                client.predict(xs[0], key="site-c")
    finally:
        replica.stop()


def test_keyed_daemon_publishes_every_key_to_a_keyed_replica(
    broker: EmbeddedBroker, digits: BenchmarkStream, tmp_path: Path
) -> None:
    """A `models.per_key` daemon on a 2-partition topic: the replica serves each key at the learner's version, with its predictions."""
    topic = f"keyed-daemon-{os.getpid()}-{time.monotonic_ns()}"
    broker.create_topic(topic, partitions=2)
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "models.per_key=true",
            "serve.port=0",
            "metrics.port=0",
            "model.hidden=[32]",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path}",
            f"publish.topic={topic}.snapshots",
            f"publish.interval_s={INTERVAL_S}",
        ],
        env={},
    )
    daemon = Daemon(config)
    replica = Replica(config, config.publish.topic)
    assert replica.registry.keyed  # a replica reads models.per_key from the learners' config
    daemon.start()
    replica.start()
    keys = ("site-a", "site-b")
    try:
        wait_until(lambda: bool(daemon.source.assigned), 60, "the group join")
        for key in keys:
            produce_stream(broker.bootstrap_servers, topic, digits, limit=400, key=key)

        def versions(registry: object) -> dict[str, int | None]:
            return {k: _version(registry.get(k)) for k in keys}  # type: ignore[attr-defined]

        wait_until(
            lambda: all(v is not None for v in versions(daemon.registry).values()), 60, "both keys learned"
        )
        assert daemon.wait_idle(30)
        wait_until(
            lambda: versions(replica.registry) == versions(daemon.registry),
            CATCH_UP_S + 10,
            "the replica at every key's version",
        )
        xs = digits.tasks[0].test_x[:20]
        assert daemon.serve_port and replica.serve_port
        with (
            PredictionClient("127.0.0.1", daemon.serve_port) as learner,
            PredictionClient("127.0.0.1", replica.serve_port) as follower,
        ):
            for key in keys:
                want, got = learner.predict_batch(xs, key=key), follower.predict_batch(xs, key=key)
                assert got["model_version"] == want["model_version"]
                assert [r["label"] for r in got["results"]] == [r["label"] for r in want["results"]]
            assert sorted(follower.info()["keys"]) == sorted(keys)
    finally:
        daemon.stop()
        replica.stop()
