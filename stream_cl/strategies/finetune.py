"""`finetune`: plain online gradient steps, no protection of old tasks (the lower bound)."""

from __future__ import annotations

from stream_cl.strategies.base import Batch, StepResult, Strategy


class Finetune(Strategy):
    name = "finetune"

    def learn(self, batch: Batch) -> StepResult:
        self.model.train()
        logits, losses = self._logits_and_losses(batch)
        self._step(losses.mean())
        return self._outcome(logits, losses, batch.y)
