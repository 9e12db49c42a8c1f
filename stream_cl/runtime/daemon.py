"""The daemon: source thread → learner thread → snapshots → prediction server and /metrics.

Lifecycle (uvicorn-style): signal handlers only set a flag; the main loop notices it and shuts
down in a fixed order under a deadline: stop consuming, let the learner finish its step, commit
the processed offsets, drain and close the socket, stop /metrics. A second signal forces exit.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from stream_cl.config import Config
from stream_cl.ingest.chunk import Chunk
from stream_cl.ingest.codec import Sample
from stream_cl.ingest.fetcher import make_source
from stream_cl.ingest.source import QueueItem
from stream_cl.learn.keyed import KeyedModels, per_key_config
from stream_cl.learn.learner import Learner
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics, start_metrics_server
from stream_cl.replicate.snapshots import SnapshotPublisher
from stream_cl.runtime.tuning import ProcessTuning
from stream_cl.serve.registry import DEFAULT_KEY, SnapshotRegistry
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
    """One daemon: owns every component and their threads. `start()`, then `stop()` (or `run()`)."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.log = get_logger("stream_cl.runtime.daemon")
        self.metrics = Metrics(registry, config.metrics.max_task_labels)
        self.holder = SnapshotHolder()
        self.queue: queue.Queue[QueueItem] = queue.Queue(maxsize=8)
        # models.per_key: one model per message key, moved between daemons through the shared store
        self.keyed = self._keyed_models() if config.models.per_key else None
        self.registry = (
            self.keyed.registry if self.keyed is not None else SnapshotRegistry.single(self.holder)
        )
        self.source = make_source(  # kafka.fetch_in_subprocess: a ProcessSource (fetcher.py)
            config,
            self.queue,
            self.metrics,
            expected_size=self._input_size,
            on_revoke=None if self.keyed is None else self.keyed.on_revoke,
            on_assign=None if self.keyed is None else self.keyed.on_assign,
        )
        self._predictions: KafkaProducer | None = None
        # publish.topic: snapshots go to Kafka for `serve --follow` replicas (replica.py)
        self._publisher = (
            SnapshotPublisher(config, self.metrics, serving=lambda key: self.registry.get(key) is not None)
            if config.publish.topic
            else None
        )
        self.checkpoints = (
            CheckpointStore(checkpoint_dir(config), config.checkpoint.keep)
            if config.checkpoint.enabled and self.keyed is None
            else None
        )
        # The one model; with models.per_key an idle stand-in (the models are in self.keyed)
        self.learner = Learner(
            config if self.keyed is None else per_key_config(config),
            self.holder,
            self.metrics,
            on_processed=self.source.mark_processed,
            dead_letter=self.source.dead_letter,
            on_unlabeled=self._publish_prediction if config.kafka.predictions_topic else None,
            checkpoints=self.checkpoints,
            on_checkpoint=lambda offsets: self.source.request_commit(),
            on_publish=lambda learner, snapshot: self._on_publish(DEFAULT_KEY, learner, snapshot),
        )
        # What the learner thread feeds: the one model, or the per-key models
        self.models: Learner | KeyedModels = self.learner if self.keyed is None else self.keyed
        self.server: PredictionServer | None = None
        self.serve_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self._learner_stop = threading.Event()
        self._learner_thread = threading.Thread(
            target=self._learn_loop, name="stream-cl-learner", daemon=True
        )
        self._source_thread = threading.Thread(target=self.source.run, name="stream-cl-source", daemon=True)
        self.learner_error: BaseException | None = None
        self._shutdown = threading.Event()
        self._signals = 0
        self._restored = False
        self.tuning = ProcessTuning(config)  # applied at start, undone at stop (runtime/tuning.py)

    def _input_size(self) -> int | None:
        return self.learner.input_size

    def _keyed_models(self) -> KeyedModels:
        cfg = self.config
        return KeyedModels(
            cfg,
            SnapshotRegistry(keyed=True),
            self.metrics,
            self.queue,
            SharedModelStore(checkpoint_dir(cfg), cfg.checkpoint.keep),
            dead_letter=lambda *args: self.source.dead_letter(*args),
            on_publish=lambda key, learner, snapshot: self._on_publish(key, learner, snapshot),
            on_unlabeled=self._publish_prediction if cfg.kafka.predictions_topic else None,
            mark_processed=lambda partition, offset: self.source.mark_processed(partition, offset),
            request_commit=lambda: self.source.request_commit(),
        )

    # -- start / stop ---------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the newest valid checkpoint (if any) and arrange for the source to resume at its offsets."""
        if self.checkpoints is None or self._restored:
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
        with self.tuning.starting_threads():  # pinned: what starts here runs off the learner's cores
            self._start_components()
        self.log.info(
            "daemon_started",
            topic=cfg.kafka.topic,
            group_id=cfg.kafka.group_id,
            strategy=cfg.strategy.name,
            serve_port=self.serve_port,
            metrics_port=self.metrics_port,
        )

    def _start_components(self) -> None:
        cfg = self.config
        if cfg.metrics.enabled:
            self._metrics_server, self.metrics_port = start_metrics_server(
                self.metrics, cfg.metrics.host, cfg.metrics.port
            )
        if cfg.serve.enabled:
            self.server = PredictionServer(cfg.serve, self.registry, self.metrics)
            self.serve_port = self.server.start()
        if cfg.kafka.predictions_topic:
            self._predictions = KafkaProducer(
                bootstrap_servers=cfg.kafka.bootstrap_servers.split(","), linger_ms=5
            )
        if self._publisher is not None:
            self._publisher.start()  # sends the restored model's snapshot, if any, at once
        if self.learner.evaluator is not None:
            self.learner.evaluator.start()
        self.tuning.apply()
        self.source.connect()  # with kafka.fetch_in_subprocess, starts the fetcher process
        self._source_thread.start()
        self._learner_thread.start()

    def _learn_loop(self) -> None:
        models = self.models
        try:
            with self.tuning.learner_thread():
                self._learn_until_stopped(models)
        except BaseException as e:
            self.learner_error = e
            self.log.exception("learner_failed")
        finally:
            self._shutdown.set()

    def _learn_until_stopped(self, models: Learner | KeyedModels) -> None:
        while not self._learner_stop.is_set():
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                models.flush()  # the stream went quiet: learn the partial batch, publish
                self._publish_idle()
                if self.source.stop_event.is_set():
                    break
                continue
            if not isinstance(item, Chunk):  # a task in stream order (a rebalance handover)
                item()
                continue
            models.process(item)
            if len(item):
                self.tuning.after_first_records()

    def stop(self, deadline_s: float = 10.0) -> None:
        """Stop in order: consuming, learning (finish the step), commit, serving, metrics."""
        t_end = time.monotonic() + deadline_s
        self.log.info("daemon_stopping")
        self.source.stop_event.set()
        self._source_thread.join(max(0.1, t_end - time.monotonic()))
        self._learner_stop.set()
        self._learner_thread.join(max(0.1, t_end - time.monotonic()))
        if not self._learner_thread.is_alive():
            self.learner.flush()
            if self.learner.evaluator is not None:
                self.learner.evaluator.stop()  # scores the rows still waiting: they are checkpointed
            if self.learner.strategy is not None:
                self.learner.checkpoint()
            if self.keyed is not None:
                self.keyed.close()  # every model and partition manifest to the shared store
        # Records still queued were never learned and are not committed: the next run re-reads them.
        try:
            self.source.close()
        except Exception:
            self.log.exception("final_commit_failed")
        if self.learner.evaluator is not None:
            self.learner.evaluator.stop()
        if self._publisher is not None:
            if not self._learner_thread.is_alive():  # the final model reaches the replicas too
                self._publisher.capture_uncaptured()
            self._publisher.close(max(0.1, t_end - time.monotonic()))
        if self._predictions is not None:
            self._predictions.close(timeout=max(0.1, t_end - time.monotonic()))
        if self.server is not None:
            self.server.stop(drain_timeout=max(0.1, t_end - time.monotonic()))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.tuning.undo()
        self.log.info("daemon_stopped", **self.models.stats())

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
            stats = self.models.stats()
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
        if self._predictions is None:
            return
        message = {"id": sample.id, **prediction}
        self._predictions.send(self.config.kafka.predictions_topic, msgpack.packb(message, use_bin_type=True))
