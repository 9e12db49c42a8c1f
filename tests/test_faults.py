"""Faults under a running daemon: the broker goes away and comes back.

Uses its own EmbeddedBroker (never the session one). Tansu's storage is memory-only, so the restarted
broker has lost the topic and every offset: the test re-creates the topic, and the new messages
start again at offset 0. The daemon still remembers having processed offsets below its old
position, so it skips that many of the new messages (a real Kafka broker keeps its log, so this
artifact of the memory-only broker does not occur there); the test produces enough to get past it.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer
from support import kafka_overrides, wait_until

from stream_cl.config import load_config
from stream_cl.ingest.codec import encode_sample
from stream_cl.runtime.daemon import Daemon
from stream_cl.tools.broker import EmbeddedBroker

FEATURES = 8


def _produce(bootstrap: str, topic: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in range(n):
        y = i % 2
        x = rng.normal(size=FEATURES).astype(np.float32) + 2 * y
        producer.send(topic, encode_sample(x, y=y))
    producer.flush()
    producer.close()


@pytest.mark.parametrize("in_subprocess", [True, False], ids=["subprocess-fetch", "in-process-fetch"])
def test_broker_stop_and_restart_under_running_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], in_subprocess: bool
) -> None:
    """The daemon survives 2 s without a broker (no failure, source thread alive) and learns again
    after; the outage shows in its metrics or its log (the fetcher process logs to the same stderr)."""
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    broker = EmbeddedBroker().start()
    try:
        broker.create_topic(topic)
        config = load_config(
            None,
            [
                *kafka_overrides(broker.bootstrap_servers, topic),
                "kafka.commit_interval_s=0.5",
                "serve.enabled=false",
                "metrics.enabled=false",
                "model.hidden=[16]",
                "evaluation.holdout_fraction=0",
                "checkpoint.enabled=false",
                "boundaries.drift=false",
                f"kafka.fetch_in_subprocess={str(in_subprocess).lower()}",
            ],
            env={},
        )
        daemon = Daemon(config)
        daemon.start()
        try:
            first = 200
            _produce(broker.bootstrap_servers, topic, first, seed=0)
            wait_until(lambda: daemon.learner.stats()["learned"] >= first, 60, "the first samples learned")

            capfd.readouterr()  # only what comes after this counts
            with caplog.at_level(logging.WARNING):
                broker.stop()
                time.sleep(2.0)
                assert daemon.failed is None
                assert daemon._source_thread.is_alive() and daemon._learner_thread.is_alive()
                assert not daemon.source.stop_event.is_set()

                broker.start()  # same port; memory-only storage: the topic is gone
                broker.create_topic(topic)
                before = daemon.learner.stats()["learned"]
                # offsets 0..first-1 of the new log count as already processed (see the module doc)
                _produce(broker.bootstrap_servers, topic, first + 300, seed=1)
                wait_until(
                    lambda: daemon.learner.stats()["learned"] >= before + 300,
                    90,
                    "learning after the restart",
                )
            assert daemon.failed is None
            errors = sum(
                daemon.metrics.sample_value("stream_cl_source_errors_total", {"kind": kind}) or 0
                for kind in ("poll", "commit")
            )
            kafka_warnings = [r.getMessage() for r in caplog.records if r.name.startswith("kafka")]
            kafka_warnings += [line for line in capfd.readouterr().err.splitlines() if "kafka" in line]
            assert errors > 0 or kafka_warnings, "the outage left no trace in metrics or logs"
        finally:
            daemon.stop()
    finally:
        broker.stop()


@pytest.mark.slow
def test_bench_soak_tiny(tmp_path: Path) -> None:
    """`stream-cl bench soak --samples 2000` runs end to end and writes its RSS figures as JSON."""
    import json

    from stream_cl import cli

    out = tmp_path / "soak.json"
    args = ["bench", "soak", "--samples", "2000", "--round", "500", "--json", str(out)]
    args += ["--set", "checkpoint.enabled=false", "--set", "serve.port=0", "--set", "metrics.port=0"]
    assert cli.main(args) == 0
    figures = json.loads(out.read_text())
    assert figures["marks"]["100%"]["samples"] >= 2000
    assert figures["marks"]["100%"]["peak_rss_mib"] >= figures["marks"]["10%"]["peak_rss_mib"] > 0
