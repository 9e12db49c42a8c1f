"""What an `eidetic` snapshot answers with: one backbone pass, every task's head rows in one product.

Built once per snapshot (`Eidetic.predictor()`), immutable, safe to call from serving threads
while the strategy learns on. A consolidated task answers with its stored head rows (they read
only owned features, so with its hint its logits are bit-identical forever); a task not
consolidated as it is now with the live head's rows for its classes. Without a hint, the rows of
every known task are laid out as one matrix answering on the padded (task, class) grid, and the
router's weights (times `router_weight`) likewise, so the joint choice (`strategies/routing.py`)
costs two products and a few tensor operations, however many tasks there are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

from stream_cl.strategies.backbones import Classifier
from stream_cl.strategies.router import RouterScores
from stream_cl.strategies.routing import Predict, TaskSlots, answer_hinted, answer_padded

# task -> (its classes, stored head weight rows, stored head bias)
TaskHeads = Mapping[int, tuple[list[int], torch.Tensor, torch.Tensor]]


class EideticPredictor:
    """`(x, task index or None) -> (probabilities, route per sample)` over a frozen model."""

    def __init__(
        self,
        model: Classifier,
        router: RouterScores | None,
        router_weight: float,
        task_classes: list[list[int]],
        task_heads: TaskHeads,
    ) -> None:
        """`model` must be a frozen copy (eval mode, no grad): it is used as it is, never copied."""
        self.model = model
        self.task_classes = [list(c) for c in task_classes]
        head = model.head
        self.n_classes = int(head.weight.shape[0])
        device = head.weight.device
        self.layout = TaskSlots.of(self.task_classes, self.n_classes, device)
        # Per known task, the rows it answers with: stored ones (copies) when its classes are as
        # when it was consolidated, else the live head's.
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t, classes in zip(self.layout.known, self.layout.classes, strict=True):
            stored = task_heads.get(t)
            if stored is not None and stored[0] == classes:
                self.rows[t] = (stored[1].clone(), stored[2].clone())
            else:
                self.rows[t] = (head.weight[classes].detach().clone(), head.bias[classes].detach().clone())
        known = self.layout.known
        weight = torch.cat([self.rows[t][0] for t in known]) if known else head.weight[:0]
        bias = torch.cat([self.rows[t][1] for t in known]) if known else head.bias[:0]
        self.grid_weight = self.layout.padded_rows(weight, 0.0)
        self.grid_bias = self.layout.padded_rows(bias, float("-inf"))
        router = router if len(known) > 1 else None
        self.router = None if router is None else router.on_grid(self.layout, router_weight)

    def __call__(self, x: torch.Tensor, task: int | None) -> Predict:
        n = x.shape[0]
        with torch.no_grad():
            if task not in self.rows and (task is not None or not self.rows):
                # Nothing learned yet, or a hint naming a task without classes: the whole head.
                logits = self.model(x)
                proba = logits if logits.shape[1] == 0 else torch.softmax(logits, dim=1)
                return proba, [task] * n
            features = self.model.features(x)
            if task is not None:
                weight, bias = self.rows[task]
                return answer_hinted(
                    F.linear(features, weight, bias), self.task_classes[task], self.n_classes
                ), [task] * n
            logits = F.linear(features, self.grid_weight, self.grid_bias).view(n, *self.layout.grid)
            scores = None if self.router is None else self.router(x)
            return answer_padded(logits, scores, self.layout)
