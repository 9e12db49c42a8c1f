"""What an `interval` snapshot serves: frozen per-task answers, and a route when no task id comes.

Everything here is a pure function of copied tensors (no strategy state), so a predictor built
here is safe to call from other threads while the strategy goes on learning.

- A task hint: that task's network answers, over its classes. An ended (frozen) task answers
  with the weights and head rows stored at its own boundary (`TaskAnswer`), so its hinted answers
  are bit-identical after any later learning; the active task with its live centre network and
  the live head.
- No hint, `routing = "router"`: the shared task router (`strategies/router.py`, also `eidetic`'s)
  picks the (task, class) pair with the best joint score, and that task's own network answers.
  `"universal"`: the universal network `θ* = H(e*)` with the live head, one forward pass.
  `"entropy"`: every task's network, per sample the least uncertain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from stream_cl.strategies.interval.bounds import TargetLayout
from stream_cl.strategies.router import RouterScores
from stream_cl.strategies.routing import Predict, entropy_route, predict_by_task


@dataclass(frozen=True)
class TaskAnswer:
    """One slot's answer as served: target weights and the head rows of the slot's classes."""

    theta: torch.Tensor  # [n_weights]
    classes: list[int]  # class indices of `weight`'s rows, in order
    weight: torch.Tensor  # [len(classes), features]
    bias: torch.Tensor  # [len(classes)]

    def logits(self, features: torch.Tensor, classes: list[int]) -> torch.Tensor | None:
        """Logits over `classes` from the stored rows; None when a class has no stored row."""
        row = {c: i for i, c in enumerate(self.classes)}
        if any(c not in row for c in classes):
            return None
        idx = torch.tensor([row[c] for c in classes], device=self.weight.device)
        return F.linear(features, self.weight[idx], self.bias[idx])

    def state_dict(self) -> dict[str, Any]:
        tensors = {"theta": self.theta, "weight": self.weight, "bias": self.bias}
        return {"classes": list(self.classes), **{k: v.detach().cpu().clone() for k, v in tensors.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> TaskAnswer:
        return cls(
            state["theta"].to(device),
            list(state["classes"]),
            state["weight"].to(device),
            state["bias"].to(device),
        )


@dataclass(frozen=True)
class ServingState:
    """Copies of everything a snapshot's predictor reads (never mutated after it is built)."""

    layout: TargetLayout
    routing: str
    max_slot: int
    task_classes: list[list[int]]
    head: tuple[torch.Tensor, torch.Tensor]  # the live head (weight, bias)
    universal: torch.Tensor  # θ*
    live: dict[int, torch.Tensor]  # slot -> its centre weights now (slots not frozen)
    stored: dict[int, TaskAnswer]  # frozen slot -> its answer as at its boundary
    router: RouterScores | None
    router_weight: float


def make_predictor(state: ServingState) -> Callable[[torch.Tensor, int | None], Predict]:
    """The predictor of `state`: `(x, task index or None) -> (probabilities, route per sample)`."""
    w, b = state.head
    n_classes = w.shape[0]

    def predict(x: torch.Tensor, task: int | None) -> Predict:
        features: dict[int, torch.Tensor] = {}  # slot -> its network's features of x

        def slot_features(slot: int) -> torch.Tensor:
            if slot not in features:
                stored = state.stored.get(slot)
                theta = stored.theta if stored is not None else state.live.get(slot, state.universal)
                features[slot] = state.layout.forward(x, theta)
            return features[slot]

        def universal_logits() -> torch.Tensor:
            return F.linear(state.layout.forward(x, state.universal), w, b)

        def task_logits(t: int) -> torch.Tensor:
            slot = min(t, state.max_slot)
            classes = state.task_classes[t]
            h = slot_features(slot)
            stored = state.stored.get(slot)
            logits = None if stored is None else stored.logits(h, classes)
            return F.linear(h, w[classes], b[classes]) if logits is None else logits

        with torch.no_grad():
            if n_classes == 0:
                return x.new_zeros((x.shape[0], 0)), [task] * x.shape[0]
            if task is None and state.routing == "universal":
                return torch.softmax(universal_logits(), dim=1), [None] * x.shape[0]
            if task is None and state.routing == "entropy":
                return entropy_route(task_logits, n_classes, state.task_classes, x)
            return predict_by_task(
                task_logits,
                universal_logits,
                n_classes,
                None if state.router is None else state.router.by_slot,
                state.router_weight,
                state.task_classes,
                x,
                task,
            )

    return predict
