"""The learning trajectory the learner records: per task, the model's weights when the task
started and when it ended, kept in checkpoints so `stream-cl transfer` can bootstrap a new model
from them (trajectory transfer)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Params = dict[str, torch.Tensor]


class TrajectoryRecorder:
    """Per task: the model's weights when it started and when it ended; the first task and the
    last `keep − 1` (a bounded checkpoint whatever the stream's length).

    A recurring task keeps its first start and its latest end. The end of the task in progress is
    the checkpoint's own model, so it is not stored twice.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.entries: list[dict[str, Any]] = []  # {"task": int, "start": Params, "end": Params | None}

    def on_boundary(self, previous_task: int | None, task: int, model: nn.Module) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if previous_task is not None:
            entry = self._entry(previous_task)
            if entry is not None:
                entry["end"] = weights
        if self._entry(task) is None:
            self.entries.append({"task": task, "start": weights, "end": None})
            # the first start (the initialization) always stays: it anchors the whole trajectory
            del self.entries[1 : max(1, len(self.entries) - self.keep + 1)]

    def _entry(self, task: int) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["task"] == task), None)

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        entries = [dict(e) for e in state]
        self.entries = entries[:1] + entries[1:][-(self.keep - 1) :] if self.keep > 1 else entries[:1]
