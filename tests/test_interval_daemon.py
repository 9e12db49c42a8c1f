"""`interval` in the real daemon (issue 29): a class-incremental stream sent with task ids keeps
every task's hinted accuracy from its own boundary to the end, and answers without a task id.

The bench (`stream-cl bench quality`) drives the learner in-process and flushed each task's last
partial batch before the next task's first sample; the daemon did not, that tail was learned as
the next task's, `interval` switched tasks inside `learn` without freezing, and two tasks were at
chance with their own hint. This runs the daemon itself on the embedded broker, held-out
evaluation with the task hint on, as a user would.
"""

from __future__ import annotations

import numpy as np
from support import kafka_overrides, wait_until

from stream_cl.config import load_config
from stream_cl.runtime.daemon import Daemon
from stream_cl.serve.client import PredictionClient
from stream_cl.strategies.interval.strategy import Interval
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import load_stream
from stream_cl.tools.producer import produce_stream

TOLERANCE = 0.01  # hinted accuracy after the last task vs at the task's own boundary


def test_every_task_keeps_its_hinted_accuracy_in_the_daemon(broker: EmbeddedBroker, topic: str) -> None:
    stream = load_stream("split-digits", seed=0, send_task=True)  # 5 tasks x 2 classes, 8x8
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.port=0",
            "checkpoint.enabled=false",
            "strategy.name=interval",
            "model.hidden=[64]",
            "evaluation.holdout_fraction=0.2",
            "evaluation.task_hint=true",
        ],
        env={},
    )
    daemon = Daemon(config)
    daemon.start()
    try:
        produce_stream(broker.bootstrap_servers, topic, stream)
        learner = daemon.learner
        wait_until(
            lambda: (
                learner.stats()["learned"] + learner.stats()["held_out"] == stream.n_train
                and learner.stats()["unpublished_steps"] == 0
            ),
            60,
            "the whole stream taken in and published",
        )
        evaluator = learner.evaluator
        assert evaluator is not None
        n_tasks = len(stream.tasks)
        wait_until(lambda: len(evaluator.final_rows) == n_tasks - 1, 30, "every boundary's row of R scored")
        at_boundary = {j: evaluator.final_rows[j][j] for j in range(n_tasks - 1)}
        final = evaluator.evaluate(daemon.holder.get())  # R[T]: the last model, each task's hint
        for j, acc in at_boundary.items():
            assert abs(final[j] - acc) <= TOLERANCE, (
                f"task {j}: hinted accuracy {final[j]:.3f} after the last task, {acc:.3f} at its boundary"
            )
        assert min(final.values()) >= 0.8, final
        strategy = learner.strategy
        assert isinstance(strategy, Interval)
        assert strategy.frozen_slots == list(range(n_tasks - 1))  # every ended task frozen

        # Over the socket, on the stream's own test split: with each task's id, and without one.
        with PredictionClient("127.0.0.1", daemon.serve_port) as client:
            hinted, routed = [], []
            for task in stream.tasks:
                for hint, into in ((task.task_id, hinted), (None, routed)):
                    reply = client.predict_batch(task.test_x, task=hint)
                    labels = [r["label"] for r in reply["results"]]
                    into.append(float(np.mean(np.asarray(labels) == task.test_y)))
        assert min(hinted) >= 0.8, hinted
        assert float(np.mean(routed)) >= 0.7, routed  # the task router, not the universal network
    finally:
        daemon.stop()
