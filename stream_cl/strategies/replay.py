"""`replay`: experience replay from a bounded reservoir of past samples.

Every step trains on the stream batch concatenated with a batch drawn from a reservoir sample of
everything learned so far (uniform over the stream, so old tasks keep a share proportional to
their length). The reservoir never holds more than `buffer_size` samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stream_cl.strategies.base import (
    Batch,
    StepResult,
    Strategy,
    StrategyContext,
    StrategyOptions,
    check_int_options,
)
from stream_cl.strategies.buffers import ReservoirBuffer


@dataclass(frozen=True)
class ReplayOptions(StrategyOptions):
    """`strategy.options` of `replay`."""

    buffer_size: int = 500  # reservoir of past samples (bounded)
    replay_batch: int = 0  # samples replayed per step; 0 = the stream batch's size

    def validate(self) -> None:
        check_int_options(1, buffer_size=self.buffer_size)
        check_int_options(0, replay_batch=self.replay_batch)


class Replay(Strategy):
    """Options: `ReplayOptions`."""

    name = "replay"
    options_type = ReplayOptions
    options: ReplayOptions
    unit_test_options = {"buffer_size": 12}

    def __init__(self, context: StrategyContext, options: ReplayOptions | None = None) -> None:
        super().__init__(context, options)
        self.replay_batch = self.options.replay_batch
        self.buffer = ReservoirBuffer(self.options.buffer_size, self.input_shape, self.device)

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
