"""Where a learner's results go: one object instead of a callback per result.

Every output is called on the learner thread. An offline learner (benchmarks, tests) leaves them
unset; the daemon connects them to the Kafka source (commits, dead letters), the predictions
topic, the snapshot publisher and the source's commit requests. Per-key models wrap the daemon's
outputs with their key (learn/keyed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stream_cl.ingest.codec import Sample
from stream_cl.ingest.source import DeadLetter
from stream_cl.serve.snapshot import Snapshot


def _ignore_offset(partition: int, offset: int) -> None:
    return None


def _ignore_offsets(offsets: dict[int, int]) -> None:
    return None


@dataclass
class LearnerOutputs:
    processed: Callable[[int, int], None] = _ignore_offset
    """(partition, offset): every record of the partition up to `offset` is learned, held out or
    skipped, so a commit may cover it."""

    dead_letter: DeadLetter | None = None
    """A record the learner refused (bad length, too many classes): to the dead-letter topic.
    Unset: the learner counts it as an invalid sample and drops it."""

    prediction: Callable[[Sample, dict[str, Any]], None] | None = None
    """(sample, {label, proba, model_version}) for each unlabeled sample, once a snapshot serves.
    Unset: unlabeled samples are only counted (no forward is run for them)."""

    # the learner is a `learn.learner.Learner` (not named here: that module imports this one)
    published: Callable[[str, Any, Snapshot], None] | None = None
    """(model key, learner, snapshot) after each snapshot the learner publishes, e.g. to hand it
    to the replica publisher. The key is the learner's (`serve.registry.DEFAULT_KEY` for the one
    model of a daemon without `models.per_key`)."""

    checkpointed: Callable[[dict[int, int]], None] = _ignore_offsets
    """After each checkpoint written, with the offsets it holds (e.g. to commit them)."""
