"""`finetune`: plain online gradient steps, no protection of old tasks (the lower bound)."""

from __future__ import annotations

from stream_cl.strategies.base import Batch, StepResult, Strategy


class Finetune(Strategy):
    name = "finetune"

    def learn(self, batch: Batch) -> StepResult:
        self.model.train()
        losses, outcome = self._forward(batch.x, batch.y)
        self._step(losses.mean())
        return outcome
