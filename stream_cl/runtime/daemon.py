"""The daemon: source thread → learner thread → snapshots → prediction server and /metrics.

Lifecycle (uvicorn-style): signal handlers only set a flag; the main loop notices it and shuts
down in the reverse order of start-up under a deadline: stop consuming, let the learner finish its
step, write the last checkpoint, commit the processed offsets, drain and close the socket, stop
/metrics. A second signal forces exit.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from stream_cl.config import Config
from stream_cl.ingest.chunk import Chunk
from stream_cl.ingest.codec import Sample
from stream_cl.ingest.fetcher import make_source
from stream_cl.ingest.sinks import PredictionsSink
from stream_cl.ingest.source import QueueItem
from stream_cl.learn.keyed import KeyedModels
from stream_cl.learn.learner import Learner
from stream_cl.learn.learning import Learning
from stream_cl.learn.outputs import LearnerOutputs
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics, start_metrics_server
from stream_cl.replicate.snapshots import SnapshotPublisher
from stream_cl.runtime.tuning import ProcessTuning
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.server import PredictionServer
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
from stream_cl.store.checkpoints import CheckpointStore
from stream_cl.store.keyed_store import SharedModelStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130


def checkpoint_dir(config: Config) -> Path:
    """`<checkpoint.dir>/<group_id>/<topic>`: a checkpoint only ever resumes the stream it was made on."""
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in (config.kafka.group_id, config.kafka.topic)]
    return Path(config.checkpoint.dir, *safe)


class Daemon:
    """One daemon: the composition root. Builds every component once, `start()`s them in a fixed
    order and `stop()`s them in the reverse order (or `run()` for both around the signals)."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.log = get_logger("stream_cl.runtime.daemon")
        self.metrics = Metrics(registry, config.metrics.max_task_labels)
        self.queue: queue.Queue[QueueItem] = queue.Queue(maxsize=8)
        self.tuning = ProcessTuning(config)  # applied at start, undone at stop (runtime/tuning.py)
        self._predictions: PredictionsSink | None = None  # kafka.predictions_topic, connected at start
        # publish.topic: snapshots go to Kafka for `serve --follow` replicas (replicate/snapshots.py)
        self._publisher = (
            SnapshotPublisher(config, self.metrics, serving=lambda key: self.registry.get(key) is not None)
            if config.publish.topic
            else None
        )
        self.learner: Learner | None = None  # the one model, or
        self.keyed: KeyedModels | None = None  # models.per_key: one model per message key
        self.holder = SnapshotHolder()
        self.checkpoints: CheckpointStore | None = None
        outputs = LearnerOutputs(
            processed=lambda partition, offset: self.source.mark_processed(partition, offset),
            dead_letter=lambda *args: self.source.dead_letter(*args),
            prediction=self._publish_prediction if config.kafka.predictions_topic else None,
            published=self._on_publish,
            checkpointed=lambda offsets: self.source.request_commit(),
        )
        self.learning: Learning
        if config.models.per_key:
            self.keyed = KeyedModels(
                config,
                SnapshotRegistry(keyed=True),
                self.metrics,
                self.queue,
                SharedModelStore(checkpoint_dir(config), config.checkpoint.keep),
                outputs,
            )
            self.registry = self.keyed.registry
            self.learning = self.keyed
        else:
            if config.checkpoint.enabled:
                self.checkpoints = CheckpointStore(checkpoint_dir(config), config.checkpoint.keep)
            self.learner = Learner(config, self.holder, self.metrics, outputs, self.checkpoints)
            self.registry = SnapshotRegistry.single(self.holder)
            self.learning = self.learner
        self.source = make_source(  # kafka.fetch_in_subprocess: a ProcessSource (ingest/fetcher.py)
            config,
            self.queue,
            self.metrics,
            expected_size=self._input_size,
            on_revoke=None if self.keyed is None else self.keyed.on_revoke,
            on_assign=None if self.keyed is None else self.keyed.on_assign,
        )
        self.server: PredictionServer | None = None
        self.serve_port: int | None = None
        self.http_port: int | None = None  # the OIP v2 HTTP front (serve.http_enabled)
        self.metrics_port: int | None = None
        self._learner_stop = threading.Event()
        self._learner_thread = threading.Thread(
            target=self._learn_loop, name="stream-cl-learner", daemon=True
        )
        self._source_thread = threading.Thread(target=self.source.run, name="stream-cl-source", daemon=True)
        self.learner_error: BaseException | None = None
        self._shutdown = threading.Event()
        self._signals = 0
        self._restored = False
        # what `start` started, as (name, stop(seconds left)): `stop` runs them last first
        self._started: list[tuple[str, Callable[[float], None]]] = []

    def _input_size(self) -> int | None:
        if self.learner is not None:
            return self.learner.input_size
        return self.config.model.input_dim or None

    # -- start / stop ---------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the newest valid checkpoint (if any) and arrange for the source to resume at its offsets."""
        if self.checkpoints is None or self.learner is None or self._restored:
            return self._restored
        self._restored = True
        found = self.checkpoints.load_latest()
        if found is None:
            return False
        state, path = found
        self.learner.load_state_dict(state)
        self.source.resume_from(self.learner.offsets)
        self.log.info(
            "checkpoint_restored", path=str(path), learned=self.learner.learned, offsets=self.learner.offsets
        )
        return True

    def start(self) -> None:
        cfg = self.config
        self.restore()
        self.tuning.plan_cpus()
        self._started.append(("tuning", lambda left: self.tuning.undo()))
        with self.tuning.starting_threads():  # pinned: what starts here runs off the learner's cores
            self._start_components()
        self.log.info(
            "daemon_started",
            topic=cfg.kafka.topic,
            group_id=cfg.kafka.group_id,
            strategy=cfg.strategy.name,
            serve_port=self.serve_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
        )

    def _start_components(self) -> None:
        """Each component in the order the data needs them, its stop registered as it starts."""
        cfg = self.config
        started = self._started
        if cfg.metrics.enabled:
            metrics_server, self.metrics_port = start_metrics_server(
                self.metrics, cfg.metrics.host, cfg.metrics.port
            )

            def stop_metrics(left: float) -> None:
                metrics_server.shutdown()
                metrics_server.server_close()

            started.append(("metrics", stop_metrics))
        if cfg.serve.enabled:
            server = self.server = PredictionServer(cfg.serve, self.registry, self.metrics)
            self.serve_port = server.start()
            self.http_port = server.http_port
            started.append(("server", lambda left: server.stop(drain_timeout=left)))
        if cfg.kafka.predictions_topic:
            predictions = self._predictions = PredictionsSink(cfg.kafka)
            started.append(("predictions", predictions.close))
        if self._publisher is not None:
            self._publisher.start()  # sends the restored model's snapshot, if any, at once
            started.append(("publisher", self._stop_publisher))
        self.source.connect()  # with kafka.fetch_in_subprocess, starts the fetcher process
        # the final commit: after the last learning, whose processed offsets it commits
        started.append(("commit", self._close_source))
        self.learning.start()
        started.append(
            ("learning", lambda left: self.learning.close(final=not self._learner_thread.is_alive()))
        )
        self.tuning.apply()
        self._learner_thread.start()
        started.append(("learner thread", self._stop_learner_thread))
        self._source_thread.start()
        started.append(("consuming", self._stop_consuming))

    def _learn_loop(self) -> None:
        learning = self.learning
        try:
            with self.tuning.learner_thread():
                self._learn_until_stopped(learning)
        except BaseException as e:
            self.learner_error = e
            self.log.exception("learner_failed")
        finally:
            self._shutdown.set()

    def _learn_until_stopped(self, learning: Learning) -> None:
        while not self._learner_stop.is_set():
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                learning.flush()  # the stream went quiet: learn the partial batch, publish
                self._publish_idle()
                if self.source.stop_event.is_set():
                    break
                continue
            if not isinstance(item, Chunk):  # a task in stream order (a rebalance handover)
                item()
                continue
            learning.process(item)
            if len(item):
                self.tuning.after_first_records()

    def stop(self, deadline_s: float = 10.0) -> None:
        """Stop what `start` started, in reverse order, under one deadline: consuming, the learner
        thread, learning's final step and checkpoint, the final commit, the publisher, the
        predictions producer, serving, /metrics, and last the process tuning."""
        t_end = time.monotonic() + deadline_s
        self.log.info("daemon_stopping")
        while self._started:
            name, stop = self._started.pop()
            try:
                stop(max(0.1, t_end - time.monotonic()))
            except Exception:
                self.log.exception("stop_failed", component=name)
        self.log.info("daemon_stopped", **self.learning.stats())

    def _stop_consuming(self, left: float) -> None:
        self.source.stop_event.set()
        self._source_thread.join(left)

    def _stop_learner_thread(self, left: float) -> None:
        self._learner_stop.set()
        self._learner_thread.join(left)

    def _close_source(self, left: float) -> None:
        # Records still queued were never learned and are not committed: the next run re-reads them.
        self.source.close()

    def _stop_publisher(self, left: float) -> None:
        assert self._publisher is not None
        if not self._learner_thread.is_alive():  # the final model reaches the replicas too
            self._publisher.capture_uncaptured()
        self._publisher.close(left)

    @property
    def failed(self) -> BaseException | None:
        return self.learner_error or self.source.error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a component fails or `request_shutdown` is called; True if it happened."""
        return self._shutdown.wait(timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until everything learned so far is in the published snapshot."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            stats = self.learning.stats()
            if stats["unpublished_steps"] == 0 and self.queue.empty():
                return True
            time.sleep(0.05)
        return False

    def request_shutdown(self) -> None:
        self._shutdown.set()

    # -- the process entry point ----------------------------------------------------------------
    def run(self, deadline_s: float = 10.0) -> int:
        """Run until SIGTERM/SIGINT (or a component fails); returns the process exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._shutdown.wait(0.5):
                if self.source.stop_event.is_set():  # the source died on its own
                    break
            self.stop(deadline_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return EXIT_FAILURE if self.failed else EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(EXIT_FORCED)  # a second Ctrl-C: the user wants out now
        self._shutdown.set()

    # -- snapshots to replicas -------------------------------------------------------------------
    def _on_publish(self, key: str, learner: Learner, snapshot: Snapshot) -> None:
        """After each snapshot publish (learner thread): hand it to the (rate-limited) publisher."""
        if self._publisher is not None:
            self._publisher.offer(key, learner, snapshot, idle=False)

    def _publish_idle(self) -> None:
        """The learner is idle (learner thread): the models' latest snapshots reach the replicas."""
        if self._publisher is not None:
            self._publisher.capture_uncaptured()

    # -- unlabeled samples ----------------------------------------------------------------------
    def _publish_prediction(self, sample: Sample, prediction: dict[str, Any]) -> None:
        if self._predictions is not None:
            self._predictions.send(sample, prediction)
