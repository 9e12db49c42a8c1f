"""One model per message key (models.per_key): routing, the shared store, handovers, exactly once.

The handover tests drive `KeyedModels` directly (real Learners, real store; the test plays the
learner thread); the last test runs two daemons in one group on the real broker.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer
from support import kafka_overrides, wait_until

from stream_cl.config import Config, ConfigError, load_config
from stream_cl.ingest.codec import Sample, encode_sample
from stream_cl.ingest.source import Chunk, QueueItem, Record
from stream_cl.learn.keyed import KeyedModels
from stream_cl.learn.keys import InvalidKey, model_key
from stream_cl.learn.outputs import LearnerOutputs
from stream_cl.metrics import Metrics
from stream_cl.runtime.daemon import Daemon, checkpoint_dir
from stream_cl.runtime.replica import Replica
from stream_cl.serve.client import PredictionClient, PredictionError
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.store.keyed_store import PartitionManifest, SharedModelStore, key_dir_name
from stream_cl.tools.broker import EmbeddedBroker

DIM = 4


def _config(*overrides: str) -> Config:
    return load_config(
        None,
        [
            "models.per_key=true",
            "model.device=cpu",
            "model.hidden=[16]",
            "model.batch_size=8",
            "model.lr=0.01",
            "learner.snapshot_every_steps=1",
            "evaluation.holdout_fraction=0",  # every sample learned: these tests count them
            *overrides,
        ],
        env={},
    )


def _features(label: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0 of every key around +1, class 1 around -1: easy to learn, per key."""
    return rng.normal(1.0 if label % 2 == 0 else -1.0, 0.3, DIM).astype(np.float32)


class Harness:
    """A KeyedModels plus the bits of the daemon around it; the test thread is its learner thread."""

    def __init__(self, config: Config, processed: list[tuple[str, int, int]]) -> None:
        self.queue: queue.Queue[QueueItem] = queue.Queue(maxsize=8)
        self.dead: list[tuple[str, int, int]] = []
        self.registry = SnapshotRegistry(keyed=True)
        self.models = KeyedModels(
            config,
            self.registry,
            Metrics(),
            self.queue,
            SharedModelStore(Path(config.checkpoint.dir), config.checkpoint.keep),
            LearnerOutputs(dead_letter=lambda raw, reason, detail, p, o: self.dead.append((reason, p, o))),
        )
        self.models.on_routed = lambda key, p, o: processed.append((key, p, o))

    def run_tasks(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            assert not isinstance(item, Chunk)
            item()

    def revoke(self, partitions: list[int]) -> None:
        """The rebalance waits in `on_revoke` (another thread) while the learner runs the handover."""
        waiting = threading.Thread(target=self.models.on_revoke, args=(partitions, False))
        waiting.start()
        item = self.queue.get(timeout=10)
        assert not isinstance(item, Chunk)
        item()
        waiting.join(10)
        assert not waiting.is_alive()

    def assign(self, partitions: list[int]) -> dict[int, int]:
        offsets = self.models.on_assign(partitions)
        self.run_tasks()
        return offsets


def _records(keys: list[str | None], rng: np.random.Generator, partition: int = 0) -> list[Record]:
    """One record per entry, at offsets 0.., keyed as given; labels alternate per key."""
    seen: Counter[str | None] = Counter()
    out = []
    for offset, key in enumerate(keys):
        y = seen[key] % 2
        seen[key] += 1
        raw_key = None if key is None else key.encode()
        out.append(Record(partition, offset, Sample(x=_features(y, rng), y=y), b"", raw_key))
    return out


def _chunks(records: list[Record], size: int = 40) -> list[list[Record]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def test_model_key_is_the_utf8_message_key() -> None:
    """The model key is the message key's UTF-8 text; no key or non-UTF-8 bytes are dead-letter reasons."""
    assert model_key("sensor-7 ☃".encode()) == "sensor-7 ☃"
    with pytest.raises(InvalidKey) as missing:
        model_key(None)
    assert missing.value.reason == "missing_key"
    with pytest.raises(InvalidKey) as bad:
        model_key(b"\xff\xfe")
    assert bad.value.reason == "bad_key"


def test_key_directories_are_safe_and_distinct() -> None:
    """Any key maps to one safe directory name: no separators, no dot names, long keys hashed."""
    keys = ["a", "A", "a/b", "..", ".", "", "a b", "a%2Fb", "x" * 500, "y" * 500, "é"]
    names = [key_dir_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    for name in names:
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")
        assert len(name) <= 202
    assert key_dir_name("x" * 500).startswith("h-")


def test_manifests_round_trip_and_a_corrupt_one_reads_as_none(tmp_path: Path) -> None:
    """A written manifest reads back; a torn or foreign file is treated as absent (resume from Kafka)."""
    store = SharedModelStore(tmp_path)
    store.write_manifest(PartitionManifest(3, 1234, ("a", "b")), writer="test")
    assert store.read_manifest(3) == PartitionManifest(3, 1234, ("a", "b"))
    assert store.read_manifest(4) is None
    store.manifest_path(3).write_text('{"format": 1, "partition": 3, "next_off')
    assert store.read_manifest(3) is None
    assert [p.name for p in (tmp_path / "partitions").iterdir()] == ["3.json"]  # no temporary files left


def test_per_key_needs_checkpoints() -> None:
    """models.per_key without checkpoints is a config error naming the key (models move through the store)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["models.per_key=true", "checkpoint.enabled=false"], env={})
    assert e.value.key == "models.per_key"


def test_handover_moves_interleaved_keys_exactly_once(tmp_path: Path) -> None:
    """Keys interleaved in one partition: revoke checkpoints all, the new owner loads them and resumes; none twice."""
    config = _config(f"checkpoint.dir={tmp_path}")
    rng = np.random.default_rng(0)
    keys: list[str | None] = [["a", "b", "c"][i % 3] if i % 7 else "a" for i in range(200)]
    records = _records(keys, rng)
    processed: list[tuple[str, int, int]] = []
    first, second = Harness(config, processed), Harness(config, processed)

    assert first.assign([0]) == {}  # no manifest yet: Kafka's committed offset / auto_offset_reset
    for chunk in _chunks(records[:123]):
        first.models.process(chunk)
    first.revoke([0])
    manifest = SharedModelStore(tmp_path).read_manifest(0)
    assert manifest == PartitionManifest(0, 123, ("a", "b", "c"))
    assert first.models.keys() == []

    assert second.assign([0]) == {0: 123}
    assert second.models.keys() == ["a", "b", "c"]  # loaded from the store before their next record
    for chunk in _chunks(records[110:]):  # a re-delivery of 110..122 first: dropped
        second.models.process(chunk)
    second.models.flush()

    produced = Counter(k for k in keys)
    assert second.models.learned_by_key() == dict(produced)
    assert len(processed) == len(set(processed)) == 200
    assert {(p, o) for _, p, o in processed} == {(0, o) for o in range(200)}
    assert all(keys[o] == k for k, _, o in processed)


def test_a_crash_resumes_from_the_last_manifest_and_learns_nothing_twice(tmp_path: Path) -> None:
    """Without a handover, the successor resumes at the manifest, held back by a key never checkpointed."""
    config = _config(f"checkpoint.dir={tmp_path}", "checkpoint.every_samples=16", "checkpoint.every_s=0")
    rng = np.random.default_rng(1)
    keys: list[str | None] = ["rare" if i == 5 else ["a", "b"][i % 2] for i in range(300)]
    records = _records(keys, rng)
    processed: list[tuple[str, int, int]] = []
    crashed = Harness(config, processed)
    crashed.assign([0])
    for chunk in _chunks(records[:200]):
        crashed.models.process(chunk)
    # the process dies here: no handover, no close; a and b were checkpointed every 16 samples
    manifest = SharedModelStore(tmp_path).read_manifest(0)
    assert manifest is not None and manifest.next_offset == 5  # "rare" (offset 5) is in no checkpoint
    assert manifest.keys == ("a", "b", "rare")

    store = SharedModelStore(tmp_path)
    in_checkpoint = {}
    for key in ("a", "b"):
        found = store.key_store(key).load_latest()
        assert found is not None
        in_checkpoint[key] = found[0]["offsets"][0]
    assert store.key_store("rare").load_latest() is None

    processed.clear()
    successor = Harness(config, processed)
    offsets = successor.assign([0])
    for chunk in _chunks(records[offsets[0] :]):
        successor.models.process(chunk)
    successor.models.flush()
    assert successor.models.learned_by_key() == dict(Counter(keys))  # checkpointed + re-read = produced
    # the successor learned exactly what no checkpoint held
    expected = {("rare", 0, 5)} | {
        (k, 0, o) for o, k in enumerate(keys) if k in in_checkpoint and o >= in_checkpoint[k]
    }
    assert len(processed) == len(set(processed))
    assert set(processed) == expected


def test_a_handover_the_learner_cannot_reach_in_time_is_abandoned(tmp_path: Path) -> None:
    """A revoke the learner does not start in time drops the partition's models unsaved; the manifest stays."""
    config = _config(f"checkpoint.dir={tmp_path}", "checkpoint.every_samples=10", "model.batch_size=4")
    records = _records(["a", "b"] * 20, np.random.default_rng(4))
    processed: list[tuple[str, int, int]] = []
    h = Harness(config, processed)
    h.assign([0])
    h.models.process(records[:30])  # 15 per key: each model checkpointed (every 10 samples)
    h.models.process(records[30:34])  # 2 more per key, in no checkpoint
    before = SharedModelStore(tmp_path).read_manifest(0)
    assert before == PartitionManifest(0, 30, ("a", "b"))
    h.models.handover_timeout_s = 0.2
    started = time.monotonic()
    h.models.on_revoke([0], False)  # nobody runs the learner's queue: the handover never begins
    assert time.monotonic() - started < 2
    h.models.process(records[34:])  # still queued behind the handover: not learned here any more
    assert len(processed) == 34
    h.run_tasks()  # the learner reaches the handover late: drops the models, saves nothing
    assert h.models.keys() == [] and h.registry.keys() == []
    assert SharedModelStore(tmp_path).read_manifest(0) == before  # the new owner re-reads from 30
    found = SharedModelStore(tmp_path).key_store("a").load_latest()
    assert found is not None and found[0]["learned"] == 15


def test_keyless_undecodable_and_surplus_keys_are_dead_lettered(tmp_path: Path) -> None:
    """No key, a non-UTF-8 key and a key past models.max_keys go to the dead letters; the manifest passes them."""
    config = _config(f"checkpoint.dir={tmp_path}", "models.max_keys=2")
    rng = np.random.default_rng(2)
    keys: list[str | None] = ["a", "b", None, "a", "c", "b", "a", "c"]
    records = _records(keys, rng)
    records[3] = Record(0, 3, records[3].sample, b"", b"\xff")
    processed: list[tuple[str, int, int]] = []
    h = Harness(config, processed)
    h.assign([0])
    h.models.process(records)
    h.models.close()
    assert sorted(h.dead) == [
        ("bad_key", 0, 3),
        ("missing_key", 0, 2),
        ("too_many_keys", 0, 4),
        ("too_many_keys", 0, 7),
    ]
    assert h.models.learned_by_key() == {"a": 2, "b": 2}
    assert SharedModelStore(tmp_path).read_manifest(0) == PartitionManifest(0, 8, ("a", "b"))
    assert h.models.metrics.sample_value("stream_cl_models") == 2


# -- two daemons, one group, the real broker --------------------------------------------------------
KEYS = ["k0", "k1", "k2", "k3"]  # key i is sent to partition i


def _produce(bootstrap: str, topic: str, per_key: int, start: int, rng: np.random.Generator) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for n in range(start, start + per_key):
        for i, key in enumerate(KEYS):
            y = 10 * i + n % 2  # each key its own labels: a reply tells which model answered
            value = encode_sample(_features(n, rng), y=y, id=n)
            producer.send(topic, value=value, key=key.encode(), partition=i)
    producer.flush()
    producer.close()


def _learned(*daemons: Daemon) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in daemons:
        assert d.keyed is not None
        total.update(d.keyed.learned_by_key())
    return dict(total)


def _versions(server: Daemon | Replica, keys: list[str]) -> dict[str, int | None]:
    """The model version `server` serves for each key (None: no model for it there)."""
    out: dict[str, int | None] = {}
    for key in keys:
        snapshot = server.registry.get(key)
        out[key] = None if snapshot is None else snapshot.version
    return out


def _check_predictions(daemon: Daemon | Replica, keys: list[str], rng: np.random.Generator) -> None:
    assert daemon.serve_port is not None
    with PredictionClient("127.0.0.1", daemon.serve_port) as client:
        for key in keys:
            i = KEYS.index(key)
            xs = np.stack([_features(n, rng) for n in range(20)])
            reply = client.predict_batch(xs, key=key)
            labels = [r["label"] for r in reply["results"]]
            expected = [10 * i + n % 2 for n in range(20)]
            assert set(labels) <= {10 * i, 10 * i + 1}, (key, labels)
            assert np.mean(np.asarray(labels) == expected) >= 0.9, (key, labels)


def test_two_daemons_split_the_keys_and_one_takes_over_when_the_other_stops(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Two daemons learn their partitions' keys; stopping one moves its models to the other; none lost, none twice.

    Both publish to one snapshot topic, and a follower replica serves every key across the handover:
    at the owner's version before it, at the survivor's (never an older one) after it.
    """
    topic = f"keyed-{time.monotonic_ns()}"
    broker.create_topic(topic, partitions=4)
    config = _config(
        *kafka_overrides(broker.bootstrap_servers, topic),
        "serve.port=0",
        "metrics.enabled=false",
        "models.max_keys=4",
        f"checkpoint.dir={tmp_path}",
        f"publish.topic={topic}.snapshots",
        "publish.interval_s=0.5",
    )
    processed: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def observe(key: str, partition: int, offset: int) -> None:
        with lock:
            processed.append((key, partition, offset))

    first, second = Daemon(config), Daemon(config)
    for d in (first, second):
        assert d.keyed is not None
        d.keyed.on_routed = observe
    rng = np.random.default_rng(3)
    stopped: set[str] = set()
    replica = Replica(config, config.publish.topic)
    first.start()
    second.start()
    replica.start()
    try:
        assert first.keyed is not None and second.keyed is not None
        wait_until(
            lambda: (
                first.keyed.assigned
                and second.keyed.assigned  # type: ignore[union-attr]
                and first.keyed.assigned | second.keyed.assigned == {0, 1, 2, 3}
            ),  # type: ignore[union-attr]
            60,
            "both daemons in the group",
        )
        assert not first.keyed.assigned & second.keyed.assigned
        _produce(broker.bootstrap_servers, topic, 200, 0, rng)
        wait_until(lambda: _learned(first, second) == dict.fromkeys(KEYS, 200), 60, "phase 1 learned")

        # each daemon holds exactly the keys of its partitions, and answers for them only
        first_keys = [KEYS[p] for p in sorted(first.keyed.assigned)]
        second_keys = [KEYS[p] for p in sorted(second.keyed.assigned)]
        assert first.keyed.keys() == first_keys and second.keyed.keys() == second_keys
        assert first.wait_idle() and second.wait_idle()
        _check_predictions(first, first_keys, rng)
        _check_predictions(second, second_keys, rng)
        assert second.serve_port is not None
        with PredictionClient("127.0.0.1", second.serve_port) as client, pytest.raises(PredictionError) as e:
            client.predict(_features(0, rng), key=first_keys[0])
        assert e.value.code == "not_ready"
        before = {**_versions(first, first_keys), **_versions(second, second_keys)}
        wait_until(lambda: _versions(replica, KEYS) == before, 30, "the replica at every key's version")

        first.stop()
        stopped.add("first")
        wait_until(lambda: second.keyed.assigned == {0, 1, 2, 3}, 60, "the survivor owns every partition")  # type: ignore[union-attr]
        wait_until(lambda: second.keyed.keys() == KEYS, 30, "the survivor loaded the moved models")  # type: ignore[union-attr]
        assert second.keyed.learned_by_key() == dict.fromkeys(KEYS, 200)  # resumed from their checkpoints
        _check_predictions(second, KEYS, rng)  # served before any new sample of the moved keys

        _produce(broker.bootstrap_servers, topic, 150, 200, rng)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send(topic, value=encode_sample(_features(0, rng), y=0), partition=0)  # no key
        producer.send(topic, value=encode_sample(_features(0, rng), y=0), key=b"k9", partition=1)  # a 5th key
        producer.flush()
        producer.close()
        wait_until(lambda: second.keyed.learned_by_key() == dict.fromkeys(KEYS, 350), 60, "phase 2 learned")  # type: ignore[union-attr]
        wait_until(lambda: second.source.dead_lettered == 2, 30, "two dead letters")
        assert second.metrics.sample_value("stream_cl_dead_letters_total", {"reason": "missing_key"}) == 1
        assert second.metrics.sample_value("stream_cl_dead_letters_total", {"reason": "too_many_keys"}) == 1
        assert second.wait_idle()
        _check_predictions(second, KEYS, rng)
        after = _versions(second, KEYS)
        assert all(after[k] > before[k] for k in KEYS), (before, after)  # the moved models went on
        wait_until(lambda: _versions(replica, KEYS) == after, 30, "the replica at the survivor's versions")
        assert replica.metrics.sample_value("stream_cl_models") == len(KEYS)  # what the replica serves
        _check_predictions(replica, KEYS, rng)
    finally:
        replica.stop()
        for name, d in (("first", first), ("second", second)):
            if name not in stopped:
                d.stop()

    with lock:
        seen = list(processed)
    assert len(seen) == len(set(seen)), "a record was learned twice"
    for i, key in enumerate(KEYS):
        assert sorted(o for k, p, o in seen if k == key) == sorted(
            o for k, p, o in seen if p == i
        )  # key i only in partition i
    by_key = Counter(k for k, _, _ in seen)
    assert by_key == dict.fromkeys(KEYS, 350)
    store = SharedModelStore(checkpoint_dir(config))
    for i, key in enumerate(KEYS):
        manifest = store.read_manifest(i)
        assert manifest is not None and manifest.keys == (key,)
        assert manifest.next_offset == 350 + (1 if i in (0, 1) else 0)  # past the two dead letters


def test_per_key_models_hold_out_score_and_export_forgetting_within_bounds(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Each key's model holds out and is scored like a single model; the daemon exports the
    aggregate over its models and per-model series for at most metrics.max_model_labels models,
    with held-out memory bounded per model and in total."""
    topic = f"keyed-eval-{time.monotonic_ns()}"
    broker.create_topic(topic, partitions=len(KEYS))
    config = _config(
        *kafka_overrides(broker.bootstrap_servers, topic),
        f"checkpoint.dir={tmp_path}",
        "serve.enabled=false",
        "metrics.enabled=false",
        "evaluation.holdout_fraction=0.2",
        "evaluation.every_samples=20",
        "evaluation.every_s=0.2",
        "evaluation.max_cpu_share=1.0",
        "evaluation.keyed_reservoir_size=10",
        "evaluation.keyed_max_samples=70",
        "metrics.max_model_labels=2",
    )
    rng = np.random.default_rng(0)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for task, labels in (("a", (0, 1)), ("b", (2, 3))):  # two tasks per key, classes of their own
        for n in range(120):
            for i, key in enumerate(KEYS):
                y = labels[n % 2]
                value = encode_sample(_features(y, rng) + (2.0 if task == "b" else 0.0), y=y, task=task)
                producer.send(topic, value=value, key=key.encode(), partition=i)
    producer.flush()
    producer.close()
    daemon = Daemon(config)
    daemon.start()
    try:
        keyed = daemon.keyed
        assert keyed is not None and keyed.evaluation is not None
        wait_until(lambda: sum(keyed.learned_by_key().values()) > 0 and daemon.queue.empty(), 60, "learning")
        value = daemon.metrics.sample_value
        wait_until(lambda: value("stream_cl_models_evaluated") == len(KEYS), 60, "every model scored")
        wait_until(lambda: value("stream_cl_average_forgetting") is not None, 60, "the aggregate forgetting")
        assert 0.0 <= value("stream_cl_average_accuracy") <= 1.0  # type: ignore[operator]
        labelled = [k for k in KEYS if value("stream_cl_model_average_accuracy", {"model": k}) is not None]
        assert len(labelled) == 2  # metrics.max_model_labels; the others are in the aggregate only
        assert (
            value("stream_cl_model_accuracy_matrix", {"model": labelled[0], "after_task": "a", "task": "a"})
            is not None
        )
        held = {key: model.learner.evaluator.held() for key, model in keyed._models.items()}  # type: ignore[union-attr]
        assert all(0 < n <= 2 * 10 for n in held.values()), held  # two tasks of at most 10 each
        assert sum(held.values()) <= 70 and keyed.evaluation.budget.held == sum(held.values())
        both = next(k for k, m in keyed._models.items() if len(m.learner.evaluator.reservoirs) == 2)  # type: ignore[union-attr]
    finally:
        daemon.stop()
    # each model's own accuracy matrix is in its checkpoint: `stream-cl report` on its directory
    from stream_cl.evaluate.evaluator import summary_from_checkpoint_state

    found = SharedModelStore(checkpoint_dir(config)).key_store(both).load_latest()
    assert found is not None
    summary = summary_from_checkpoint_state(found[0])
    assert summary["tasks"] == ["a", "b"] and summary["matrix"][0][0] is not None  # R[a][a], at a's boundary
