"""`IntervalOptions`: the options of the `interval` strategy (`strategy.options`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stream_cl.strategies.base import check_int_options, check_number_options, is_int
from stream_cl.strategies.router import RouterOptions

ROUTINGS = ("router", "universal", "entropy")
IMPORTANCES = ("none", "fisher")


@dataclass(frozen=True)
class IntervalOptions(RouterOptions):
    """`strategy.options` of `interval` (HyperInterval; an mlp backbone, inputs >= 0).

    The task router's options (router_features, router_lam, router_weight, router_refresh; used
    with `routing = "router"`) are `RouterOptions` in strategies/router.py."""

    embedding_dim: int = 24  # task embedding size M
    epsilon: float = 0.5  # embedding box: centre (ε/2M)·cos(e), radius ε/M
    beta: float = 0.01  # weight of the regularizer keeping old tasks' weights and old head rows
    # Regularizer metric: fisher (summed diagonal Fisher of the frozen tasks) | none (plain L2).
    importance: str = "fisher"
    hyper_hidden: tuple[int, ...] = (100, 100)  # hypernetwork hidden widths
    chunk_size: int = 2048  # target weights generated per hypernetwork call (keeps H small)
    chunk_dim: int = 8  # learned chunk-embedding size
    ramp_steps: int = 100  # batches (in samples) of a task over which ε ramps up and κ 1 → 0.5
    consolidation_steps: int = 50  # batches from the task buffer at a boundary
    # A task is consolidated when left only once it learned this many samples since its last
    # consolidation (the back and forth of a gradual transition makes every switch a boundary).
    min_consolidation: int = 64
    # Reservoir of the ending task's samples (bounded; also the Fisher's data).
    consolidation_buffer: int = 500
    max_tasks: int = 32  # embedding slots and stored targets (later tasks share the last)
    # No task hint: router (the task router picks a task, whose network answers; ~router_features²
    # floats, no stored samples) | universal (one network θ* = H(e*)) | entropy (one pass per task).
    routing: str = "router"
    # Serve an ended task (hinted or routed) with its centre weights and head rows as stored at its
    # own boundary: bit-identical answers after any later learning, max_tasks × |θ| floats. false =
    # its centre network H(c_t) as now (the paper's; held by the regularizer only, which drifts).
    keep_task_weights: bool = True

    def validate(self) -> None:
        super().validate()
        check_int_options(
            1,
            embedding_dim=self.embedding_dim,
            chunk_size=self.chunk_size,
            chunk_dim=self.chunk_dim,
            consolidation_buffer=self.consolidation_buffer,
            max_tasks=self.max_tasks,
            min_consolidation=self.min_consolidation,
        )
        check_int_options(0, ramp_steps=self.ramp_steps, consolidation_steps=self.consolidation_steps)
        check_number_options(0, epsilon=self.epsilon, beta=self.beta)
        hidden = self.hyper_hidden
        if not isinstance(hidden, Sequence) or not all(is_int(h) and h > 0 for h in hidden):
            raise ValueError(
                f"strategy.options.hyper_hidden: expected a list of positive widths, got {hidden!r}"
            )
        if self.routing not in ROUTINGS:
            raise ValueError(
                f"strategy.options.routing: expected one of {', '.join(ROUTINGS)}; got {self.routing!r}"
            )
        if self.importance not in IMPORTANCES:
            raise ValueError(
                f"strategy.options.importance: expected one of {', '.join(IMPORTANCES)}; "
                f"got {self.importance!r}"
            )
