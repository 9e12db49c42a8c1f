"""What the daemon's learner thread feeds: one model (`Learner`) or one model per message key
(`KeyedModels`). The daemon builds exactly one of them and drives it through this interface."""

from __future__ import annotations

from typing import Any, Protocol

from stream_cl.ingest.source import Chunk


class Learning(Protocol):
    def start(self) -> None:
        """Start what runs beside the learner thread (the evaluator's scoring thread)."""

    def process(self, chunk: Chunk) -> None:
        """Learn one polled chunk, in stream order (learner thread)."""

    def flush(self) -> None:
        """The stream went quiet: learn partial batches, publish, write a checkpoint that is due."""

    def close(self, final: bool = True) -> None:
        """At shutdown. `final` (the learner thread has stopped): learn what is pending, score the
        held-out rows still waiting and write the last checkpoint. Otherwise only stop the
        background threads: the learner thread may still be inside a step."""

    def stats(self) -> dict[str, Any]:
        """Counters for logs and `Daemon.wait_idle` (`unpublished_steps` among them)."""
