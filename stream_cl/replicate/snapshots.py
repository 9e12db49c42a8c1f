"""Prediction replicas: the learner publishes its snapshots to Kafka, followers serve them.

`SnapshotPublisher` (in the learning daemon, `publish.topic` set): the learner publishes a new
snapshot every few steps, far too often to ship each one. The publisher therefore
- captures the strategy's state on the learner thread (tensor clones, `state_dict()`) only when a
  send could be due: the model's first publish, a task boundary, `publish.interval_s` since the
  last capture, or the learner going idle (the daemon's learner loop calls `capture_uncaptured`
  when its queue is empty: the last snapshot before a quiet spell must reach the replicas, and an
  idle learner has the time);
- keeps one pending capture per model (latest wins: bounded memory whatever the cadence) and
  serializes, chunks and sends it on its own thread, at most once per `publish.interval_s` per
  model, except boundaries and the model's first snapshot, which go at once;
- at shutdown captures what was not captured yet and sends everything still pending.

`SnapshotFollower` (in `stream-cl serve --follow TOPIC`): reads the topic from the start with no
consumer group (every replica reads everything), reassembles and verifies each snapshot
(`replicate/wire.py`), rebuilds the strategy and publishes a `Snapshot` with exactly the learner's
version into its `SnapshotRegistry`; `PredictionServer` serves it with the same socket protocol.
Until it has read up to where the topic ended when it started, it only assembles: a replica
joining late loads each model's latest snapshot once, not its whole history.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from stream_cl.config import Config
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics
from stream_cl.replicate.wire import (
    Assembler,
    PublishedSnapshot,
    SnapshotCapture,
    SnapshotRejected,
    encode,
    rebuild,
    tombstones,
)
from stream_cl.serve.registry import DEFAULT_KEY, SnapshotRegistry
from stream_cl.serve.snapshot import Snapshot

if TYPE_CHECKING:
    from stream_cl.learn.learner import Learner

# Topic settings when the publisher creates the topic. Compaction keeps each model's latest
# manifest and chunks; small segments let the cleaner run within minutes rather than after 1 GB.
TOPIC_CONFIGS = {"cleanup.policy": "compact", "segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1"}
# Room for a chunk's msgpack envelope and the key on top of `publish.chunk_bytes`.
ENVELOPE_BYTES = 65_536


def _partition(model: str, partitions: int) -> int:
    """Every message of one model goes to one partition, so its chunks precede its manifest."""
    import zlib

    return zlib.crc32(model.encode()) % max(1, partitions)


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """Create the snapshot topic (compacted) unless it exists; a broker refusing the settings gets none."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers.split(","), request_timeout_ms=10_000)
    try:
        if topic in admin.list_topics():
            return
        for configs in (TOPIC_CONFIGS, {}):
            try:
                admin.create_topics(
                    [NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=configs)]
                )
                return
            except TopicAlreadyExistsError:
                return
            except Exception as e:  # e.g. a broker that rejects a config key
                if not configs:
                    raise
                get_logger("stream_cl.replicate.snapshots").warning(
                    "snapshot_topic_configs_refused", topic=topic, error=str(e)
                )
    finally:
        admin.close()


class _PublisherMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.published = Counter(
            "stream_cl_snapshots_published", "Snapshots sent to publish.topic.", registry=r
        )
        self.failures = Counter(
            "stream_cl_snapshot_publish_failures", "Snapshot sends that failed (retried).", registry=r
        )


class _FollowerMetrics:
    def __init__(self, metrics: Metrics, keyed: bool) -> None:
        r = metrics.registry
        # what a keyed replica serves: as many models as a per-key learner holds (same series)
        self.models = Gauge("stream_cl_models", "Models this replica serves.", registry=r) if keyed else None
        self.applied = Counter(
            "stream_cl_replica_snapshots_applied", "Snapshots this replica loaded and serves.", registry=r
        )
        self.rejected = Counter(
            "stream_cl_replica_snapshots_rejected",
            "Snapshot messages this replica refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.age = Gauge(
            "stream_cl_replica_snapshot_age_seconds",
            "At the latest load: seconds from the learner's capture to serving it here.",
            registry=r,
        )
        self._registry = r
        self._last_applied: Gauge | None = None  # registered at the first load: absent, never 0, before

    def loaded(self, now: float, created_at: float) -> None:
        """A snapshot captured at `created_at` is served from `now` on."""
        self.applied.inc()
        self.age.set(max(0.0, now - created_at))
        if self._last_applied is None:
            # Staleness: `time() - this` keeps growing while nothing is applied (the age above freezes).
            self._last_applied = Gauge(
                "stream_cl_replica_last_applied_timestamp_seconds",
                "Unix time this replica last applied a snapshot (absent until its first).",
                registry=self._registry,
            )
        self._last_applied.set(now)


# -- learner side ---------------------------------------------------------------------------------
def capture_learner(model: str, learner: Learner, version: int) -> SnapshotCapture | None:
    """The learner's inference state as published at `version` (learner thread, right after it)."""
    strategy = learner.strategy
    if strategy is None or learner.input_shape is None or not learner.labels:
        return None
    return SnapshotCapture(
        model=model,
        version=version,
        strategy=strategy.name,
        labels=tuple(learner.labels),
        tasks=tuple(learner.detector.task_ids),
        input_shape=tuple(learner.input_shape),
        state=strategy.state_dict(),  # CPU clones: the learner may step on at once
    )


class SnapshotPublisher:
    """Rate-limited, latest-wins snapshot publishing on a thread of its own (see module docstring)."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        serving: Callable[[str], bool] | None = None,
        producer: Any = None,
    ) -> None:
        self.config = config
        # Whether this daemon still holds a model: a model handed to another daemon (a rebalance)
        # must not have a stale capture sent after its new owner's snapshots.
        self.serving = serving
        self.cfg = config.publish
        self.log = get_logger("stream_cl.replicate.snapshots")
        self.metrics = _PublisherMetrics(metrics)
        self._producer = producer
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[SnapshotCapture, bool]] = {}  # model -> (capture, urgent)
        self._sent_at: dict[str, float] = {}  # model -> monotonic time of its last send
        self._previous: dict[str, tuple[str, int]] = {}  # model -> (publish_id, chunks) on the topic
        # learner-thread bookkeeping
        self._captured_at: dict[str, float] = {}
        self._captured_version: dict[str, int] = {}
        self._boundaries: dict[str, int] = {}
        self._uncaptured: dict[str, weakref.ref[Learner]] = {}
        self._partitions = 1
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stream-cl-publisher", daemon=True)
        self.sent = 0

    def start(self) -> None:
        cfg = self.cfg
        ensure_topic(self.config.kafka.bootstrap_servers, cfg.topic, cfg.partitions)
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(
                bootstrap_servers=self.config.kafka.bootstrap_servers.split(","),
                max_request_size=cfg.chunk_bytes + ENVELOPE_BYTES,
                acks="all",
                retries=5,
                max_in_flight_requests_per_connection=1,  # keep chunks before their manifest
                linger_ms=0,
            )
        partitions = self._producer.partitions_for(cfg.topic)
        self._partitions = len(partitions) if partitions else 1
        self._thread.start()
        self.log.info("snapshot_publisher_started", topic=cfg.topic, partitions=self._partitions)

    # -- learner thread ---------------------------------------------------------------------------
    def offer(self, model: str, learner: Learner, snapshot: Snapshot, idle: bool) -> None:
        """Called on the learner thread after each publish; captures the state when a send may be due."""
        boundaries = len(learner.boundaries)
        now = time.monotonic()
        first = model not in self._captured_at
        boundary = boundaries != self._boundaries.get(model, boundaries)
        due = now - self._captured_at.get(model, 0.0) >= self.cfg.interval_s
        if not (first or boundary or due or idle):
            self._uncaptured[model] = weakref.ref(learner)
            return
        self._capture(model, learner, snapshot.version, urgent=first or boundary)

    def _capture(self, model: str, learner: Learner, version: int, urgent: bool) -> None:
        capture = capture_learner(model, learner, version)
        if capture is None:
            return
        self._captured_at[model] = time.monotonic()
        self._captured_version[model] = version
        self._boundaries[model] = len(learner.boundaries)
        self._uncaptured.pop(model, None)
        with self._cond:
            previous = self._pending.get(model)
            self._pending[model] = (capture, urgent or (previous is not None and previous[1]))
            self._cond.notify_all()

    def capture_uncaptured(self, models: Iterable[str] | None = None) -> None:
        """Capture every model whose latest version was skipped.

        Only where no learner can step meanwhile: on the learner thread while it is idle, or at
        shutdown after it stopped.
        """
        keep = None if models is None else set(models)
        for model, ref in list(self._uncaptured.items()):
            learner = ref()
            if learner is None or (keep is not None and model not in keep) or not self._serves(model):
                self._uncaptured.pop(model, None)
                continue
            if learner.version > self._captured_version.get(model, -1):
                self._capture(model, learner, learner.version, urgent=False)  # close() sends it anyway

    def _serves(self, model: str) -> bool:
        return self.serving is None or self.serving(model)

    def forget(self, model: str) -> None:
        """The model moved to another daemon: send nothing more for it from here."""
        self._uncaptured.pop(model, None)
        with self._cond:
            self._pending.pop(model, None)

    # -- publisher thread -------------------------------------------------------------------------
    def _due(self, now: float) -> tuple[str, SnapshotCapture] | None:
        """The pending capture to send now (stopping: any), or None."""
        for model, (capture, urgent) in self._pending.items():
            if self._stopping or urgent or now - self._sent_at.get(model, -1e9) >= self.cfg.interval_s:
                return model, capture
        return None

    def _next_wait(self, now: float) -> float:
        waits = [self._sent_at.get(m, -1e9) + self.cfg.interval_s - now for m in self._pending]
        return max(0.01, min(waits, default=1.0))

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    item = self._due(now)
                    if item is not None or (self._stopping and not self._pending):
                        break
                    self._cond.wait(self._next_wait(now))
                if item is None:
                    return
                model, capture = item
                del self._pending[model]
                self._sent_at[model] = now
            try:
                self._send(capture)
            except Exception as e:
                self.metrics.failures.inc()
                self.log.warning(
                    "snapshot_publish_failed", model=model, version=capture.version, error=str(e)
                )
                with self._cond:  # retry after the interval unless a newer capture came meanwhile
                    self._pending.setdefault(model, (capture, False))
                    if self._stopping:
                        return

    def _send(self, capture: SnapshotCapture) -> None:
        cfg = self.cfg
        if not self._serves(capture.model):
            return
        publish_id, messages, size = encode(capture, self.config, cfg.chunk_bytes)
        if size > cfg.max_snapshot_bytes:
            self.metrics.failures.inc()
            self.log.error(
                "snapshot_too_large", model=capture.model, bytes=size, limit=cfg.max_snapshot_bytes
            )
            return
        partition = _partition(capture.model, self._partitions)
        producer = self._producer
        futures = [
            producer.send(cfg.topic, key=key, value=value, partition=partition) for key, value in messages
        ]
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises the send's error: the caller counts and retries it
        previous = self._previous.get(capture.model)
        if previous is not None:  # the superseded chunks can go: the new manifest is on the topic
            for key in tombstones(capture.model, *previous):
                producer.send(cfg.topic, key=key, value=None, partition=partition)
        self._previous[capture.model] = (publish_id, len(messages) - 1)
        self.sent += 1
        self.metrics.published.inc()
        self.log.debug("snapshot_published", model=capture.model, version=capture.version, bytes=size)

    def close(self, timeout: float = 10.0) -> None:
        """Send everything pending (ignoring the interval), then close the producer."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(timeout=max(0.1, timeout))
            with contextlib.suppress(Exception):
                self._producer.close(timeout=max(0.1, timeout))


# -- replica side ---------------------------------------------------------------------------------
class SnapshotFollower:
    """Reads a snapshot topic and keeps `registry` serving the latest snapshot of every model."""

    def __init__(
        self,
        config: Config,
        topic: str,
        registry: SnapshotRegistry,
        metrics: Metrics,
        on_applied: Callable[[str, Snapshot], None] | None = None,
    ) -> None:
        self.config = config
        self.topic = topic
        self.registry = registry
        self.metrics = metrics
        self.replica_metrics = _FollowerMetrics(metrics, keyed=registry.keyed)
        self.on_applied = on_applied
        self.log = get_logger("stream_cl.replicate.snapshots")
        self.assembler = Assembler(config.publish.max_snapshot_bytes)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.applied = 0
        self._consumer: Any = None
        self._end: dict[Any, int] | None = None  # offsets the topic ended at when we joined
        self._latest: dict[str, PublishedSnapshot] = {}  # verified, not yet applied
        self._thread = threading.Thread(target=self._run, name="stream-cl-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()

    @property
    def caught_up(self) -> bool:
        return self._end is not None and not self._end

    def _connect(self) -> bool:
        """Assign every partition of the topic, from the start; False while the topic does not exist."""
        from kafka import KafkaConsumer

        cfg = self.config
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                bootstrap_servers=cfg.kafka.bootstrap_servers.split(","),
                group_id=None,  # every replica reads every snapshot
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_bytes=max(cfg.kafka.fetch_max_bytes, cfg.publish.chunk_bytes + ENVELOPE_BYTES),
                max_partition_fetch_bytes=max(
                    cfg.kafka.max_partition_fetch_bytes, cfg.publish.chunk_bytes + ENVELOPE_BYTES
                ),
            )
        from kafka import TopicPartition

        partitions = self._consumer.partitions_for_topic(self.topic)
        if not partitions:
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        ends = self._consumer.end_offsets(tps)
        self._end = {tp: end for tp, end in ends.items() if end > 0}
        self.log.info("follower_assigned", topic=self.topic, partitions=len(tps), backlog=sum(ends.values()))
        return True

    def _run(self) -> None:
        backoff = 0.2
        try:
            while not self.stop_event.is_set():
                try:
                    if self._end is None and not self._connect():
                        self.stop_event.wait(0.5)  # the learner has not created the topic yet
                        continue
                    self._poll()
                    backoff = 0.2
                except Exception as e:  # broker away: kafka-python reconnects; we back off
                    self.log.warning("follower_error", error=str(e))
                    self.stop_event.wait(backoff)
                    backoff = min(5.0, backoff * 2)
        except BaseException as e:
            self.error = e
            self.log.exception("follower_failed")

    def _poll(self) -> None:
        batches = self._consumer.poll(timeout_ms=200)
        for records in batches.values():
            for record in records:
                try:
                    done = self.assembler.feed(record.value)
                except SnapshotRejected as e:
                    self._rejected(e, record)
                    continue
                if done is not None:
                    self._latest[done.model] = done
        if self._end:  # still reading the backlog: only the newest snapshot per model gets loaded
            for tp in list(self._end):
                if self._consumer.position(tp) >= self._end[tp]:
                    del self._end[tp]
            if self._end:
                return
        self._apply_latest()

    def _apply_latest(self) -> None:
        latest, self._latest = self._latest, {}
        for model, published in latest.items():
            if not self.registry.keyed and model != DEFAULT_KEY:
                self._rejected(SnapshotRejected("wrong_key", f"an unkeyed replica got model {model!r}"), None)
                continue
            try:
                snapshot = rebuild(published, self.config)
            except SnapshotRejected as e:
                self._rejected(e, None)
                continue
            self.registry.publish(model, snapshot)
            if self.replica_metrics.models is not None:
                self.replica_metrics.models.set(len(self.registry.keys()))
            self.applied += 1
            self.replica_metrics.loaded(time.time(), float(published.manifest["created_at"]))
            self.metrics.model_version.set(snapshot.version)
            self.log.info("snapshot_applied", model=model, version=snapshot.version)
            if self.on_applied is not None:
                self.on_applied(model, snapshot)

    def _rejected(self, error: SnapshotRejected, record: Any) -> None:
        self.replica_metrics.rejected.labels(reason=error.reason).inc()
        where = None if record is None else f"{record.topic}:{record.partition}:{record.offset}"
        self.log.warning("snapshot_rejected", reason=error.reason, detail=str(error), source=where)
