"""`stream-cl serve --follow TOPIC`: a prediction-only process (follower + socket + /metrics).

The follower (`stream_cl.replicate.snapshots.SnapshotFollower`) keeps a `SnapshotRegistry` at the learners'
latest snapshots; `PredictionServer` serves it with the same protocol as a learning daemon.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from stream_cl.config import Config
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics, start_metrics_server
from stream_cl.replicate.snapshots import SnapshotFollower
from stream_cl.runtime.tuning import set_torch_threads
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.server import PredictionServer


def keyed_models(config: Config) -> bool:
    """Whether the learners publish one model per message key (`models.per_key`, when that exists)."""
    return bool(getattr(getattr(config, "models", None), "per_key", False))


class Replica:
    """A prediction-only process: follower + prediction socket + /metrics. `start()`, `stop()` or `run()`."""

    def __init__(self, config: Config, topic: str, keyed: bool | None = None) -> None:
        self.config = config
        self.log = get_logger("stream_cl.replicate.snapshots")
        self.metrics = Metrics(None, config.metrics.max_task_labels)
        self.registry = SnapshotRegistry(keyed=keyed_models(config) if keyed is None else keyed)
        self.follower = SnapshotFollower(config, topic, self.registry, self.metrics)
        self.server = PredictionServer(config.serve, self.registry, self.metrics)
        self.serve_port: int | None = None
        self.http_port: int | None = None  # the OIP v2 HTTP front (serve.http_enabled)
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self._shutdown = threading.Event()
        self._signals = 0

    def start(self) -> None:
        cfg = self.config
        set_torch_threads(cfg)  # the forwards of the snapshots it serves
        if cfg.metrics.enabled:
            self._metrics_server, self.metrics_port = start_metrics_server(
                self.metrics, cfg.metrics.host, cfg.metrics.port
            )
        self.serve_port = self.server.start()
        self.http_port = self.server.http_port
        self.follower.start()
        self.log.info(
            "replica_started",
            topic=self.follower.topic,
            keyed=self.registry.keyed,
            serve_port=self.serve_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
        )

    def stop(self, deadline_s: float = 10.0) -> None:
        t_end = time.monotonic() + deadline_s
        self.follower.stop(max(0.1, t_end - time.monotonic()))
        self.server.stop(drain_timeout=max(0.1, t_end - time.monotonic()))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.log.info("replica_stopped", applied=self.follower.applied)

    def run(self, deadline_s: float = 10.0) -> int:
        """Serve until SIGTERM/SIGINT; a second signal forces exit. Returns the exit code."""

        def on_signal(signum: int, frame: Any) -> None:
            self._signals += 1
            if self._signals > 1:
                os._exit(130)
            self._shutdown.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._shutdown.wait(0.5):
                if self.follower.error is not None:
                    break
            self.stop(deadline_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.follower.error is not None else 0
