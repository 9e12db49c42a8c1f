"""`interval`: HyperInterval — a hypernetwork, interval task embeddings, one universal network.

Protection (HyperInterval, Krukowski et al. 2024): a hypernetwork `H` (`interval/bounds.py`)
generates every weight of the MLP backbone from a task embedding; the head stays an ordinary
`ExpandingHead` run by the head policy, so `ls` / `class_mean` rows and `freeze_old` compose.
Task `t` owns the embedding box `c_t ± ε/M` with the nested centre `c_t = (ε/2M)·cos(e_t)`.

- Online, per mini-batch of the current task: `H`, the current embedding and the head learn
  `κ·CE(z_M) + (1−κ)·CE(z_worst)`, where `z_M` are the logits of the centre network `H(c_t)`,
  and `z_worst` takes the lower logit bound for the true class and the upper one for the others,
  from sound interval propagation through `H` and then through the target MLP (inputs and ReLU
  outputs are non-negative). `ε` ramps from 0 and `κ` from 1 to 0.5 over `ramp_steps` batches of
  the task (a stream has no "first half of training"). The head takes point weights (the live
  rows); its interval input still makes the worst case cover it.
- Regularizer: `β · mean_j Σ_k Ω_k (H(c_j) − θ̂_j)_k²` over frozen tasks `j`, with targets `θ̂_j`
  stored at the last boundary (divided by the number of tasks once, not twice as in the reference
  code), plus the same distance for the shared head's rows of earlier classes (stored at the last
  boundary too: the head is not generated, and left free it alone forgot most of permuted-mnist).
  `importance = "none"` is the paper's plain L2 (`Ω = 1`); the default `"fisher"` weights each
  generated weight and head entry by the summed diagonal Fisher of the frozen tasks (each task's
  scaled to mean 1, from per-sample gradients on its buffer at its boundary). Measured on
  permuted-mnist, plain L2 either forgot ~5 points or, with a larger β, stopped new tasks from
  being learned; the Fisher metric kept forgetting under 1 point at similar plasticity. β = 0.01,
  the paper's range, was the best trade-off measured on 10 permuted-mnist tasks (both weaker and
  stronger forgot more; stronger also learned each new task worse as the summed Fisher grew).
- Boundary: a short consolidation pass (`consolidation_steps` batches at the full `ε`, `κ = ½`)
  on a bounded reservoir of the ending task, then its embedding is frozen (restored bit-exactly
  after every step, since Adam's moments would otherwise keep moving it) and all targets are
  recomputed. A recurring task unfreezes its own embedding and goes on training it.
- Serving (`interval/serving.py`): a hint → that task's network over its classes; an ended task
  answers with the centre weights and head rows stored at its own boundary (`keep_task_weights`),
  so its hinted answers never change. No hint: the task router (`routing = "router"`, shared with
  `eidetic`) picks the task, the universal network `θ* = H(e*)` (`"universal"`; `e*` the midpoint
  of the intersection of the trained tasks' boxes), or the least uncertain task (`"entropy"`).

What the intervals do in a one-pass stream (measured, split- and permuted-mnist): the worst-case
term drives `H`'s sensitivity to the embedding towards zero, so the weight boxes end up narrow and
every task's centre network, and the universal one, are nearly the same network; the protection of
old tasks is then the regularizer's, and the target MLP's width decides how much it keeps (figures
in docs/benchmarks.md). `H` has a per-weight output bias: without it every Adam step moved whole
chunks coherently, and at the paper's ε = 0.5–1 new tasks stayed at chance.

Memory: `max_tasks` embedding slots, stored targets and stored task answers (`max_tasks × |θ|`
each; a task index beyond the last slot shares the last slot), one importance vector (`|θ|` +
head), the `consolidation_buffer` reservoir and the router's statistics (no samples). `H` stays
small through chunking (`chunk_size`), see `interval/bounds.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from stream_cl.strategies.base import (
    Batch,
    Boundary,
    StepResult,
    Strategy,
    StrategyContext,
)
from stream_cl.strategies.buffers import ReservoirBuffer, TaskBuffers
from stream_cl.strategies.interval.bounds import (
    HyperNetwork,
    TargetLayout,
    nested_centres,
    universal_embedding,
    write_mlp,
)
from stream_cl.strategies.interval.fisher import diagonal_fisher
from stream_cl.strategies.interval.options import IntervalOptions
from stream_cl.strategies.interval.serving import ServingState, TaskAnswer, make_predictor


class Interval(Strategy):
    """HyperInterval. Options: `IntervalOptions`."""

    name = "interval"
    options_type = IntervalOptions
    options: IntervalOptions
    unit_test_options = {
        "embedding_dim": 4,
        "hyper_hidden": [8],
        "chunk_size": 64,
        "consolidation_steps": 2,
        "consolidation_buffer": 12,
        "max_tasks": 4,
        "min_consolidation": 4,
    }

    def __init__(self, context: StrategyContext, options: IntervalOptions | None = None) -> None:
        if context.model.backbone != "mlp":
            raise ValueError(
                f"strategy.options: interval generates an MLP backbone; model.backbone is "
                f"{context.model.backbone!r}"
            )
        super().__init__(context, options)
        o = self.options
        max_tasks = o.max_tasks
        self.epsilon = float(o.epsilon)
        self.beta = float(o.beta)
        self.ramp_steps = o.ramp_steps
        self.consolidation_steps = o.consolidation_steps
        self.max_tasks = max_tasks
        self.routing = o.routing
        self.importance = o.importance
        self.layout = TargetLayout([math.prod(self.input_shape), *self.model_config.hidden])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.model_config.seed + 2)
            self.hyper = HyperNetwork(
                self.layout, o.embedding_dim, list(o.hyper_hidden), o.chunk_size, o.chunk_dim, max_tasks
            ).to(self.device)
        # A submodule of the classifier: optimizer (rebuilt on head growth), checkpoints and
        # pickling then carry H and the embeddings like any other weight.
        self.model.hyper = self.hyper
        for p in self.model.backbone.parameters():
            p.requires_grad_(False)  # materialized from H; never trained directly
        # Per slot, the samples learned since its last consolidation (the active slot's, and the
        # previous one's while its visits were too short to consolidate; no others are kept).
        self.buffers = TaskBuffers(o.consolidation_buffer, self.input_shape, self.device)
        self.consolidated_at = [0] * max_tasks  # slot_samples at the slot's last consolidation
        self.frozen_embeddings = torch.zeros_like(self.hyper.embeddings.detach())
        self.targets = torch.zeros(max_tasks, self.layout.n_weights, device=self.device)
        self.frozen_slots: list[int] = []  # slots with a frozen embedding and a stored target
        # The head's rows at the last boundary: the head is shared by all tasks, so it is regularized
        # towards them like the generated weights (unprotected, it alone forgot most of permuted-mnist).
        self.head_target: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per-weight importance of the regularizer (`importance = "fisher"`): the summed, normalized
        # diagonal Fisher of the frozen tasks, for the generated weights and the head (None = plain L2).
        self.weight_importance: torch.Tensor | None = None
        self.head_importance: tuple[torch.Tensor, torch.Tensor] | None = None
        self.trained = [False] * max_tasks
        # Samples learned per slot: drives the ε/κ ramp. Samples, not steps, since a step can be a
        # batch of one or two (a partial batch learned when the stream goes quiet or a task ends;
        # earlier also at each new label), which as full steps ramped ε up before anything was
        # learned and let the worst case kill every ReLU.
        self.slot_samples = [0] * max_tasks
        # Per frozen slot, its answer as at its own boundary (`keep_task_weights`): what serving
        # uses for it, so its hinted answers never change (replaced at the slot's next boundary,
        # never mutated: published predictors hold them).
        self.task_answers: dict[int, TaskAnswer] = {}
        # Routing without a task hint (`routing = "router"`): streaming statistics, no samples.
        self.router = (
            o.make_router(self.input_shape, context.seed + 3, self.device) if o.routing == "router" else None
        )
        self.active = 0
        self._sync_backbone(self._centre_weights(0))
        self.optimizer = self._make_optimizer()

    # -- embeddings and generated weights -------------------------------------------------------
    def _slot(self, task: int) -> int:
        return min(task, self.max_tasks - 1)

    def _embedding(self, slot: int) -> torch.Tensor:
        """A frozen slot's stored embedding (no gradient), else the live parameter row."""
        if slot in self.frozen_slots:
            return self.frozen_embeddings[slot]
        return self.hyper.embeddings[slot]

    def _centre_weights(self, slot: int) -> torch.Tensor:
        with torch.no_grad():
            centre, _ = nested_centres(self._embedding(slot), self.epsilon)
            return self.hyper(centre.unsqueeze(0))[0]

    def _route_slots(self) -> list[int]:
        """Slots a task-free prediction covers: every trained one and the active one."""
        return sorted({s for s in range(self.max_tasks) if self.trained[s]} | {self.active})

    def universal_weights(self) -> torch.Tensor:
        """`θ* = H(e*)`, `e*` the midpoint of the intersection of the covered tasks' boxes."""
        with torch.no_grad():
            emb = torch.stack([self._embedding(s) for s in self._route_slots()])
            centres, radius = nested_centres(emb, self.epsilon)
            return self.hyper(universal_embedding(centres, radius).unsqueeze(0))[0]

    def protects_with_task_hint(self) -> bool:
        return True

    def weight_radius(self) -> float:
        """Mean half-width of the weight boxes `[θ_L, θ_U]` over the trained tasks (a bench figure)."""
        radii = []
        with torch.no_grad():
            for s in self._route_slots():
                centre, radius = nested_centres(self._embedding(s), self.epsilon)
                lo, hi = self.hyper.bounds(centre, radius)
                radii.append(float(((hi - lo) / 2).mean()))
        return sum(radii) / len(radii)

    def _sync_backbone(self, theta: torch.Tensor) -> None:
        """Write `θ` into the classifier's plain MLP (what head policies' `model.features` use)."""
        write_mlp(self.model.backbone, self.layout, theta)

    @property
    def buffer(self) -> ReservoirBuffer:
        """The active slot's samples since its last consolidation."""
        return self.buffers.of(self.active)

    # -- learning -------------------------------------------------------------------------------
    def _activate(self, slot: int) -> None:
        """Make `slot` the trained one; a recurring (frozen) task's embedding thaws."""
        if slot in self.frozen_slots:
            self.frozen_slots.remove(slot)
            with torch.no_grad():
                self.hyper.embeddings[slot] = self.frozen_embeddings[slot]
        self.active = slot

    def _losses(
        self, x: torch.Tensor, y: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample worst-case losses, centre logits, centre features and centre weights."""
        centre, radius = nested_centres(self.hyper.embeddings[self.active], self.epsilon)
        theta = self.hyper(centre.unsqueeze(0))[0]
        features = self.layout.forward(x, theta)
        logits = self.model.head(features)
        if progress <= 0:
            return self._loss(logits, y), logits, features, theta
        theta_lo, theta_hi = self.hyper.bounds(centre, radius * progress)
        x_flat = x.flatten(1)
        h_lo, h_hi = self.layout.bounds(x_flat, x_flat, theta_lo, theta_hi)
        w, b = self.model.head.weight, self.model.head.bias
        z_lo = F.linear(h_lo, w.clamp(min=0)) + F.linear(h_hi, w.clamp(max=0)) + b
        z_hi = F.linear(h_hi, w.clamp(min=0)) + F.linear(h_lo, w.clamp(max=0)) + b
        worst = torch.where(F.one_hot(y, logits.shape[1]).bool(), z_lo, z_hi)
        kappa = 1.0 - 0.5 * progress
        return kappa * self._loss(logits, y) + (1 - kappa) * self._loss(worst, y), logits, features, theta

    def _regularizer(self) -> torch.Tensor | None:
        """`mean_j ||H(c_j) − θ̂_j||²` over frozen tasks other than the active one, plus the
        head's old rows' distance to their values at the last boundary."""
        slots = [s for s in self.frozen_slots if s != self.active]
        if not slots or self.beta == 0:
            return None
        centres, _ = nested_centres(self.frozen_embeddings[slots], self.epsilon)
        # In weight units, as the paper (whose H outputs the weights themselves).
        drift = (self.hyper(centres) - self.targets[slots]) ** 2
        if self.weight_importance is not None:
            drift = drift * self.weight_importance
        reg = drift.sum(dim=1).mean()
        if self.head_target is not None:
            w, b = self.head_target
            n = w.shape[0]
            head = self.model.head
            dw, db = (head.weight[:n] - w) ** 2, (head.bias[:n] - b) ** 2
            if self.head_importance is not None:
                dw, db = dw * self.head_importance[0][:n], db * self.head_importance[1][:n]
            reg = reg + dw.sum() + db.sum()
        return reg

    def _accumulate_fisher(self, slot: int) -> None:
        """Add the ending task's diagonal empirical Fisher (on its buffer) to the importances.

        Per-sample gradients of the loss w.r.t. the task's centre weights and the head, squared and
        averaged; scaled so the mean over generated weights is 1, which keeps `beta` on the scale
        of the plain L2 regularizer.
        """
        if not len(self.buffer):
            return
        theta = self._centre_weights(slot)
        head = self.model.head
        x, y = self.buffer.inputs(), self.buffer.y[: len(self.buffer)]
        f_theta, f_w, f_b = diagonal_fisher(
            self.layout, self._loss, theta, head.weight.detach(), head.bias.detach(), x, y
        )
        if self.weight_importance is None:
            self.weight_importance = torch.zeros_like(theta)
        self.weight_importance += f_theta
        if self.head_importance is not None:
            old_w, old_b = self.head_importance
            f_w[: old_w.shape[0]] += old_w
            f_b[: old_b.shape[0]] += old_b
        self.head_importance = (f_w, f_b)

    def _progress(self) -> float:
        if self.ramp_steps == 0:
            return 1.0
        return min(1.0, self.slot_samples[self.active] / (self.ramp_steps * self.model_config.batch_size))

    def _update(self, losses: torch.Tensor) -> None:
        loss = losses.mean()
        reg = self._regularizer()
        if reg is not None:
            loss = loss + self.beta * reg
        self._step(loss)
        with torch.no_grad():
            for s in self.frozen_slots:
                self.hyper.embeddings[s] = self.frozen_embeddings[s]

    def learn(self, batch: Batch) -> StepResult:
        self.model.train()
        slot = self._slot(batch.task)
        if slot != self.active:  # a batch of another task without a boundary first: end the active one
            self._switch_to(slot)
            self.model.train()
        x, y = batch.x, batch.y
        progress = self._progress()
        losses, logits, features, theta = self._losses(x, y, progress)
        outcome = self._outcome(logits, losses, y)
        self._sync_backbone(theta.detach())
        rows = self.head_policy.observe(self.model, x, features.detach(), y)
        if rows is not None and self._write_rows(rows):
            losses = self._losses(x, y, progress)[0]
        self._update(losses)
        self.trained[slot] = True
        self.slot_samples[slot] += len(y)
        self.buffer.add(x, y, self.generator)
        if self.router is not None:
            self.router.observe(x, y, batch.task)
        return outcome

    def on_boundary(self, event: Boundary) -> None:
        """Consolidate and freeze the ending task (once it learned enough), move on."""
        super().on_boundary(event)
        consolidated = self._switch_to(self._slot(event.task))
        if self.router is not None and consolidated:  # a short visit leaves the router's schedule
            if self.router.due_at_boundary():
                self.router.solve()
            self.router.new_task(event.task)

    def _switch_to(self, slot: int) -> bool:
        """End the active slot's task and activate `slot`; True when the ending task was consolidated.

        Whatever moves training to another slot comes through here, a boundary or a batch of
        another task (a task left unfrozen kept a live embedding that nothing regularized, and its
        hinted answers fell to chance). A task is consolidated, frozen and its targets stored once
        it learned `min_consolidation` samples since its last consolidation (its buffer holds
        them); a shorter visit of a task consolidated before freezes it again as it was.
        """
        if slot == self.active:
            return False
        ending = self.active
        learned = self.slot_samples[ending] - self.consolidated_at[ending]
        consolidated = self.trained[ending] and learned >= self.options.min_consolidation
        if consolidated:
            self._consolidate()
            if self.importance == "fisher":
                self._accumulate_fisher(ending)
            with torch.no_grad():
                self.frozen_embeddings[ending] = self.hyper.embeddings[ending].detach()
            self.frozen_slots = sorted({*self.frozen_slots, ending})
            with torch.no_grad():
                for s in self.frozen_slots:
                    self.targets[s] = self._centre_weights(s)
                head = self.model.head
                self.head_target = (head.weight.detach().clone(), head.bias.detach().clone())
                if self.options.keep_task_weights:
                    self._store_answer(ending)
            self.consolidated_at[ending] = self.slot_samples[ending]
            self.buffers.drop(ending)
        elif self.consolidated_at[ending]:
            with torch.no_grad():
                self.hyper.embeddings[ending] = self.frozen_embeddings[ending]
            self.frozen_slots = sorted({*self.frozen_slots, ending})
        self.buffers.keep_only(ending, slot)
        self._activate(slot)
        self._sync_backbone(self._centre_weights(slot))
        return consolidated

    def _consolidate(self) -> None:
        """A few batches from the ending task's reservoir at the full ε and κ = ½."""
        if not len(self.buffer):
            return
        self.model.train()
        for _ in range(self.consolidation_steps):
            x, y = self.buffer.sample(self.model_config.batch_size, self.generator)
            self._update(self._losses(x, y, 1.0)[0])

    # -- prediction -----------------------------------------------------------------------------
    def _slot_classes(self, slot: int) -> list[int]:
        """The classes of every task served by `slot` (tasks beyond the last slot share it)."""
        tasks = [t for t in range(len(self.task_classes)) if self._slot(t) == slot]
        return sorted({c for t in tasks for c in self.task_classes[t]})

    def _store_answer(self, slot: int) -> None:
        """Keep `slot`'s centre weights and its classes' head rows as they are now (its boundary)."""
        classes = self._slot_classes(slot)
        head = self.model.head
        with torch.no_grad():
            self.task_answers[slot] = TaskAnswer(
                self._centre_weights(slot).clone(),
                classes,
                head.weight[classes].detach().clone(),
                head.bias[classes].detach().clone(),
            )

    def _serving_state(self) -> ServingState:
        """Copies of what a predictor reads, safe to use while the strategy goes on learning."""
        router = None
        if self.router is not None:
            if self.router.stale():
                self.router.request_solve()  # routes with the newest finished solve meanwhile
            router = self.router.scores_fn()
        head = self.model.head
        stored = {s: a for s, a in self.task_answers.items() if s in self.frozen_slots}
        return ServingState(
            layout=self.layout,
            routing=self.routing,
            max_slot=self.max_tasks - 1,
            task_classes=[list(c) for c in self.task_classes],
            head=(head.weight.detach().clone(), head.bias.detach().clone()),
            universal=self.universal_weights(),
            live={s: self._centre_weights(s) for s in self._route_slots() if s not in stored},
            stored=stored,
            router=router,
            router_weight=float(self.options.router_weight),
        )

    def predict_proba(
        self, x: torch.Tensor, task: int | None = None
    ) -> tuple[torch.Tensor, list[int | None]]:
        return make_predictor(self._serving_state())(x, task)

    def predictor(self) -> Any:
        """Serving copies: a hint → its task's network; none → `routing` (see `interval/serving.py`)."""
        return make_predictor(self._serving_state())

    # -- state ----------------------------------------------------------------------------------
    def settle(self) -> bool:
        return self.router is not None and self.router.settle()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "interval": {
                "frozen_embeddings": self.frozen_embeddings.detach().cpu().clone(),
                "targets": self.targets.detach().cpu().clone(),
                "frozen_slots": list(self.frozen_slots),
                "trained": list(self.trained),
                "slot_samples": list(self.slot_samples),
                "active": self.active,
                "buffers": self.buffers.state_dict(),
                "consolidated_at": list(self.consolidated_at),
                "head_target": _cpu(self.head_target),
                "weight_importance": _cpu(self.weight_importance),
                "head_importance": _cpu(self.head_importance),
                "task_answers": {s: a.state_dict() for s, a in self.task_answers.items()},
                "router": None if self.router is None else self.router.state_dict(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        extra = state["interval"]
        self.frozen_embeddings = extra["frozen_embeddings"].to(self.device)
        self.targets = extra["targets"].to(self.device)
        self.frozen_slots = list(extra["frozen_slots"])
        self.trained = list(extra["trained"])
        self.slot_samples = list(extra["slot_samples"])
        self.active = int(extra["active"])
        # A checkpoint from before per-slot buffers holds one buffer, the active slot's.
        self.buffers.load_state_dict(extra.get("buffers", {self.active: extra.get("buffer")}))
        # Before short visits were left unconsolidated every frozen slot was consolidated when left.
        saved = extra.get("consolidated_at")
        self.consolidated_at = (
            list(saved)
            if saved is not None
            else [self.slot_samples[s] if s in self.frozen_slots else 0 for s in range(self.max_tasks)]
        )
        self.head_target = _pair_to(extra.get("head_target"), self.device)
        self.head_importance = _pair_to(extra.get("head_importance"), self.device)
        importance = extra.get("weight_importance")
        self.weight_importance = None if importance is None else importance.to(self.device)
        answers = extra.get("task_answers") or {}
        self.task_answers = {int(s): TaskAnswer.from_state(a, self.device) for s, a in answers.items()}
        if self.router is not None and extra.get("router") is not None:
            self.router.load_state_dict(extra["router"])

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        return {
            **super().memory_usage(),
            "consolidation_buffer": (self.buffers.held(), self.options.consolidation_buffer),
            "stored_targets": (len(self.frozen_slots), self.max_tasks),
            "task_answers": (len(self.task_answers), self.max_tasks),
        }


def _cpu(value: Any) -> Any:
    """A detached CPU copy of a tensor or a tuple of tensors (None stays None)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(t.detach().cpu().clone() for t in value)
    return value.detach().cpu().clone()


def _pair_to(
    pair: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if pair is None else (pair[0].to(device), pair[1].to(device))
