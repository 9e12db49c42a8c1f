"""`replay`: experience replay from a bounded reservoir of past samples.

Every step trains on the stream batch concatenated with a batch drawn from a reservoir sample of
everything learned so far (uniform over the stream, so old tasks keep a share proportional to
their length). The reservoir never holds more than `buffer_size` samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stream_cl.config import ModelConfig
from stream_cl.strategies.base import Batch, StepResult, Strategy, check_int_options
from stream_cl.strategies.buffers import ReservoirBuffer


class Replay(Strategy):
    """Options: `buffer_size` (samples kept), `replay_batch` (replayed per step; 0 = the batch's size)."""

    name = "replay"
    unit_test_options = {"buffer_size": 12}

    def __init__(
        self,
        input_shape: Sequence[int],
        model: ModelConfig | None = None,
        head: str = "random",
        head_options: Mapping[str, Any] | None = None,
        loss: str = "ce",
        device: str = "auto",
        buffer_size: int = 500,
        replay_batch: int = 0,
    ) -> None:
        check_int_options(1, buffer_size=buffer_size)
        check_int_options(0, replay_batch=replay_batch)
        super().__init__(
            input_shape, model=model, head=head, head_options=head_options, loss=loss, device=device
        )
        self.replay_batch = replay_batch
        self.buffer = ReservoirBuffer(buffer_size, self.input_shape, self.device)

    def learn(self, batch: Batch) -> StepResult:
        self.model.train()
        x, y = batch.x, batch.y
        if len(self.buffer):
            old_x, old_y = self.buffer.sample(self.replay_batch or len(batch.y), self.generator)
            x, y = torch.cat([x, old_x]), torch.cat([y, old_y])
        losses, outcome = self._forward(x, y, observed=len(batch.y))
        self._step(losses.mean())
        self.buffer.add(batch.x, batch.y, self.generator)
        return outcome

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        return {**super().memory_usage(), "replay_buffer": (len(self.buffer), self.buffer.capacity)}
