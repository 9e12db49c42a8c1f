"""Checkpoints: atomic and checksummed, exact round-trips, and kill -9 recovery on the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from kafka import KafkaProducer
from support import kafka_overrides

from stream_cl.bench.offline import stream_records
from stream_cl.config import Config, load_config
from stream_cl.ingest.codec import encode_sample
from stream_cl.learn.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.runtime.daemon import Daemon, checkpoint_dir
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.store.checkpoints import CheckpointStore, read_checkpoint
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import load_stream
from stream_cl.tools.producer import produce_stream


def _config(*overrides: str) -> Config:
    return load_config(None, ["model.hidden=[32]", "evaluation.holdout_fraction=0", *overrides], env={})


def test_store_keeps_the_last_k_and_loads_the_newest(tmp_path: Path) -> None:
    """Saving more than `keep` checkpoints prunes the oldest; load returns the newest."""
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(4):
        store.save({"i": i})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000003.pt", "ckpt-0000000004.pt"]
    loaded = store.load_latest()
    assert loaded is not None and loaded[0]["i"] == 3


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_a_corrupt_newest_checkpoint_is_skipped(tmp_path: Path, damage: str) -> None:
    """A torn or corrupted newest file is skipped with a warning; the previous one is loaded."""
    store = CheckpointStore(tmp_path, keep=3)
    store.save({"i": 1, "w": torch.arange(100.0)})
    newest = store.save({"i": 2, "w": torch.arange(100.0)})
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[-10] ^= 0xFF
    else:
        data = bytearray(b"not a checkpoint at all")
    newest.write_bytes(bytes(data))
    loaded = store.load_latest()
    assert loaded is not None and loaded[0]["i"] == 1


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    """The write-then-rename leaves only complete checkpoint files in the directory."""
    store = CheckpointStore(tmp_path, keep=5)
    for i in range(3):
        store.save({"i": i})
    assert all(p.name.startswith("ckpt-") for p in tmp_path.iterdir())


def _learner(config: Config, store: CheckpointStore | None = None) -> Learner:
    return Learner(config, SnapshotHolder(), Metrics(), checkpoints=store)


def test_learner_state_round_trips_exactly(tmp_path: Path) -> None:
    """A learner restored from a checkpoint predicts bit-identically and keeps learning in lockstep."""
    stream = load_stream("split-digits", seed=0)
    chunks = stream_records(stream, chunk=100)
    # Checkpoints flush partial batches, so both learners checkpoint at the same (sample-count)
    # points: no wall-clock trigger (every_s) and no wall-clock deferral (min_interval_s), which
    # made the two learners cut their batches at different samples now and then.
    config = _config(f"checkpoint.dir={tmp_path}", "checkpoint.every_s=0", "checkpoint.min_interval_s=0")
    store = CheckpointStore(tmp_path / "a")
    a = _learner(config, store)
    for chunk in chunks[:7]:
        a.process(chunk)
    assert a.checkpoint()
    latest = store.load_latest()
    assert latest is not None
    state = read_checkpoint(latest[1])
    assert state["learned"] == a.learned == 700
    b = _learner(config, CheckpointStore(tmp_path / "b"))
    b.load_state_dict(state)
    xs = np.concatenate([t.test_x for t in stream.tasks])
    assert a.publish() is not None and b.holder.get() is not None
    pa, pb = a.holder.get(), b.holder.get()
    assert pa is not None and pb is not None
    assert np.array_equal(pa.predict(xs).proba, pb.predict(xs).proba)
    for chunk in chunks[7:]:
        a.process(chunk)
        b.process(chunk)
    a.flush()
    b.flush()
    for (name, ta), tb in zip(
        a.strategy.model.state_dict().items(), b.strategy.model.state_dict().values(), strict=True
    ):  # type: ignore[union-attr]
        assert torch.equal(ta, tb), name
    assert a.learned == b.learned == stream.n_train
    assert b.offsets == a.offsets


def test_unwritable_checkpoint_dir_keeps_learning(tmp_path: Path) -> None:
    """A checkpoint directory that cannot be written counts a failure and learning goes on."""
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    config = _config(f"checkpoint.dir={blocker}", "checkpoint.every_samples=100")
    learner = _learner(config, CheckpointStore(blocker / "sub"))
    for chunk in stream_records(load_stream("split-digits", seed=0), chunk=100)[:5]:
        learner.process(chunk)
    learner.flush()
    assert learner.learned == 500
    assert learner.metrics.sample_value("stream_cl_checkpoint_failures_total") >= 1  # type: ignore[operator]
    assert learner.holder.get() is not None


def _metrics_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "daemon_started":
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return int(event["metrics_port"])
    raise AssertionError("daemon_started was never logged")


def _learned(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return float(
        next(
            x for x in body.splitlines() if x.startswith('stream_cl_samples_total{outcome="learned"}')
        ).split()[-1]
    )


def test_kill_9_then_restart_learns_every_sample_exactly_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """kill -9 mid-stream, restart: the model equals the checkpoint bit for bit and every valid sample is learned once."""
    topic = f"kill9-{time.monotonic_ns()}"
    broker.create_topic(topic)
    stream = load_stream("split-digits", seed=0)
    overrides = [
        *kafka_overrides(broker.bootstrap_servers, topic),
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.every_samples=200",
        "checkpoint.at_boundary=false",
        "kafka.max_poll_records=100",  # small chunks: checkpoints land mid-stream
        "model.hidden=[32]",
        "evaluation.holdout_fraction=0",
        "serve.port=0",
        "metrics.port=0",
        "log.format=json",
    ]
    first_half = produce_stream(broker.bootstrap_servers, topic, stream, limit=800)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    producer.send(topic, b"\x00garbage")
    producer.send(topic, msgpack.packb({"y": 1}))
    producer.flush()
    args = [sys.executable, "-m", "stream_cl.cli", "run"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = _metrics_port(proc)
        store = CheckpointStore(checkpoint_dir(load_config(None, overrides, env={})))
        deadline = time.monotonic() + 120
        while (_learned(port) < first_half or store.load_latest() is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _learned(port) >= first_half
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    found = store.load_latest()
    assert found is not None, "no checkpoint was written before the kill"
    state, _ = found
    assert 0 < state["learned"] <= first_half
    # the rest of the stream arrives while the daemon is down
    producer.send(topic, msgpack.packb({"x": [1.0, float("inf")], "y": 1}))
    for x, y, task, i in stream.iter_samples():
        if i >= first_half:
            producer.send(topic, encode_sample(x, y=y, task=task, id=i, shape=stream.input_shape))
    producer.flush()
    producer.close()

    restarted = Daemon(
        load_config(None, [*overrides[:-3], "serve.enabled=false", "metrics.enabled=false"], env={})
    )
    assert restarted.restore()
    assert restarted.learner.strategy is not None
    for name, tensor in restarted.learner.strategy.model.state_dict().items():
        assert torch.equal(tensor, state["strategy"]["model"][name]), name
    restarted.start()
    try:
        deadline = time.monotonic() + 120
        while restarted.learner.stats()["learned"] < stream.n_train and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # anything read twice would show up as extra learned samples now
        assert restarted.learner.stats()["learned"] == stream.n_train
        assert restarted.source.dead_lettered >= 1
    finally:
        restarted.stop()
