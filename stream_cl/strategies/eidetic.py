"""`eidetic`: mask freezing (EideticNet, field-guide §5) with a task router; no forgetting by construction.

Per task the network learns online on its *free* neurons. At the boundary that ends a task the
strategy consolidates on a bounded buffer of that task: it prunes the free neurons with the lowest
scores (L1/L2 norm of their incoming weights, or Taylor `|a · ∂L/∂a|`), a fraction per step, with
a few recovery steps after each, and stops when accuracy on the buffer falls below
`best · (1 − tol)`, undoing that last step. The surviving neurons become the task's: their incoming
weights, bias and BatchNorm parameters are *fixed* from then on, and so are their synapses from
neurons not owned by this or an earlier task, which are set to zero. So an owned neuron computes
the same function of the input forever: it reads only neurons that are themselves fixed (forward
transfer from old to new neurons stays allowed, never the reverse). The pruned neurons are
re-initialized as free capacity for the next task. The task's head rows are then copied, their
columns for neurons it does not own zeroed: predicting with a task hint for a consolidated task
uses that copy, so its logits are bit-identical after any later learning (eval mode).

Why fixing is exact: a fixed entry's gradient is zeroed by a hook (so no optimizer moment ever
builds up on it), every task starts a fresh optimizer (no momentum carried over from the time it
was free), and after every optimizer step fixed entries are written back from their stored values
(weight decay, which adds `λ·p` to the gradient after hooks ran, cannot move them either).
BatchNorm channels of owned neurons normalize with their stored running statistics even in
training mode, and those statistics are never updated. LayerNorm mixes neurons, so it is refused.

Routing without a task id: a small router network (on the raw input, so that its input does not
shift when free neurons are retrained) predicts the task from bounded per-task reservoirs; it
trains online with balanced replay from them and is retrained at each boundary. Then the chosen
task's head predicts the class. A task hint bypasses the router; the route taken is returned.

Consolidation runs synchronously inside `on_boundary`, on the learner thread: serving keeps
answering from the last published snapshot, and the learner publishes the consolidated model when
`on_boundary` returns. Capacity is finite: `free_capacity_ratio()` says how much is left (the
learner exports it as `stream_cl_free_capacity_ratio`); when no free neuron reaches the head, a
`capacity_exhausted` warning is logged and later tasks train their head rows on the owned features.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.config import ModelConfig
from stream_cl.log import get_logger
from stream_cl.models import Classifier, ExpandingHead
from stream_cl.strategies.base import Batch, Boundary, StepResult, Strategy, check_int_options
from stream_cl.strategies.buffers import ReservoirBuffer

SCORES = ("l1", "l2", "taylor")
FREE = -1  # rank of a neuron no task owns


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose `frozen` channels always normalize with, and never update, stored statistics."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_buffer("frozen", torch.zeros(num_features, dtype=torch.bool))

    def frozen_channels(self) -> torch.Tensor:
        """Bool mask [channels]: channels owned by a task."""
        frozen = self.frozen
        assert isinstance(frozen, torch.Tensor)
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.frozen_channels()
        if not self.training or not bool(frozen.any()):
            return super().forward(x)
        assert self.running_mean is not None and self.running_var is not None
        stored = F.batch_norm(
            x,
            self.running_mean.clone(),
            self.running_var.clone(),
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
        )
        # Batch statistics update copies (the graph may keep them); the frozen channels keep theirs.
        mean, var = self.running_mean.clone(), self.running_var.clone()
        momentum = 0.1 if self.momentum is None else self.momentum
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(torch.where(frozen, self.running_mean, mean))
            self.running_var.copy_(torch.where(frozen, self.running_var, var))
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        return torch.where(frozen.view(1, -1, 1, 1), stored, out)


@dataclass
class ProtectedLayer:
    """A Linear or Conv2d whose output units are neurons, with its BatchNorm and input grouping.

    `group` is how many input columns each unit of the previous layer feeds (H·W when a conv
    output is flattened into a Linear, else 1).
    """

    module: nn.Linear | nn.Conv2d
    norm: FrozenStatsBatchNorm2d | None
    group: int

    @property
    def units(self) -> int:
        return self.module.weight.shape[0]


def protected_layers(backbone: nn.Module) -> list[ProtectedLayer]:
    """The backbone's Linear/Conv2d layers in forward order; swaps BatchNorm2d for the frozen-stats kind.

    Raises ValueError on LayerNorm/GroupNorm: they normalize across neurons, so a new neuron would
    change an owned neuron's output and the guarantee would not hold.
    """
    for name, m in backbone.named_modules():
        if isinstance(m, nn.LayerNorm | nn.GroupNorm):
            raise ValueError(
                f"strategy eidetic: {type(m).__name__} at backbone.{name} mixes neurons, so mask "
                "freezing cannot protect the layers it normalizes; use BatchNorm or no norm layer"
            )
    for parent in backbone.modules():
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                swapped = FrozenStatsBatchNorm2d(child.num_features).to(child.weight.device)
                swapped.load_state_dict(child.state_dict(), strict=False)
                setattr(parent, child_name, swapped)
    modules = list(backbone.modules())
    layers: list[ProtectedLayer] = []
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        nxt = modules[i + 1] if i + 1 < len(modules) else None
        norm = nxt if isinstance(nxt, FrozenStatsBatchNorm2d) else None
        group = 1
        if layers and isinstance(m, nn.Linear) and isinstance(layers[-1].module, nn.Conv2d):
            group = m.in_features // layers[-1].units
        layers.append(ProtectedLayer(m, norm, group))
    return layers


class Eidetic(Strategy):
    """Mask freezing + a task router. Options (all bounded):

    `task_buffer` samples of the current task kept for consolidation; `prune_step` fraction of the
    task's free neurons pruned per step; `recovery_steps` optimizer steps after each; `tol`
    relative accuracy drop allowed; `score` l1 | l2 | taylor; `max_prune_steps`;
    `router_reservoir` samples kept per task for the router; `router_hidden`; `router_epochs`
    passes over the reservoirs at each boundary; `router_lr` (Adam).
    """

    name = "eidetic"
    unit_test_options = {"task_buffer": 16, "recovery_steps": 2, "router_reservoir": 8, "router_hidden": 8}

    def __init__(
        self,
        input_shape: Sequence[int],
        model: ModelConfig | None = None,
        head: str = "random",
        head_options: Mapping[str, Any] | None = None,
        loss: str = "ce",
        device: str = "auto",
        task_buffer: int = 1000,
        prune_step: float = 0.3,
        recovery_steps: int = 50,
        tol: float = 0.01,
        score: str = "l1",
        max_prune_steps: int = 20,
        router_reservoir: int = 200,
        router_hidden: int = 128,
        router_epochs: int = 5,
        router_lr: float = 0.001,
    ) -> None:
        check_int_options(
            1, task_buffer=task_buffer, router_reservoir=router_reservoir, router_hidden=router_hidden
        )
        check_int_options(
            0, recovery_steps=recovery_steps, max_prune_steps=max_prune_steps, router_epochs=router_epochs
        )
        if not 0 < prune_step < 1:
            raise ValueError(f"strategy.options.prune_step: expected 0 < prune_step < 1, got {prune_step!r}")
        if not 0 <= tol < 1:
            raise ValueError(f"strategy.options.tol: expected 0 <= tol < 1, got {tol!r}")
        if not router_lr > 0:
            raise ValueError(f"strategy.options.router_lr: expected > 0, got {router_lr!r}")
        if score not in SCORES:
            raise ValueError(f"strategy.options.score: expected one of {', '.join(SCORES)}, got {score!r}")
        super().__init__(
            input_shape, model=model, head=head, head_options=head_options, loss=loss, device=device
        )
        self.task_buffer_size, self.prune_step, self.recovery_steps = task_buffer, prune_step, recovery_steps
        self.tol, self.score, self.max_prune_steps = tol, score, max_prune_steps
        self.router_reservoir_size, self.router_epochs = router_reservoir, router_epochs
        self.router_lr = router_lr
        self.layers = protected_layers(self.model.backbone)
        # rank[l][i]: consolidation number that owns unit i of layer l, or FREE.
        self.rank = [torch.full((layer.units,), FREE, dtype=torch.long) for layer in self.layers]
        self.consolidations: list[int] = []  # task consolidated at each rank
        # Fixed entries and the values they are held at (owned neurons, pruned neurons during pruning).
        self.fixed_mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self._protected_params()}
        self.fixed_value = {n: torch.zeros_like(p) for n, p in self._protected_params()}
        self.task_heads: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        self.task_buffer = ReservoirBuffer(task_buffer, self.input_shape, self.device)
        self.reservoirs: list[ReservoirBuffer] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.model_config.seed + 2)
            self.router_trunk = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(self.input_shape), router_hidden), nn.ReLU()
            ).to(self.device)
        self.router_head = ExpandingHead(router_hidden).to(self.device)
        self.router_optimizer = self._make_router_optimizer()
        self.exhausted = False
        self.log = get_logger("stream_cl.strategies.eidetic")
        self._hooks: list[Any] = []
        self._install_hooks()
        self.optimizer = self._make_optimizer()  # the model's BatchNorm modules were swapped

    # -- fixed entries: hooks and write-back ----------------------------------------------------
    def _protected_params(self) -> list[tuple[str, torch.Tensor]]:
        params: list[tuple[str, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            params += [(f"{i}.weight", layer.module.weight)]
            if layer.module.bias is not None:
                params += [(f"{i}.bias", layer.module.bias)]
            if layer.norm is not None:
                params += [(f"{i}.norm.weight", layer.norm.weight), (f"{i}.norm.bias", layer.norm.bias)]
        return params

    def _install_hooks(self) -> None:
        """Zero the gradient of every fixed entry, so optimizer moments never build up on it."""
        for name, p in self._protected_params():
            mask = self.fixed_mask[name]
            self._hooks.append(p.register_hook(lambda g, m=mask: g.masked_fill(m, 0.0)))

    def _write_back(self) -> None:
        with torch.no_grad():
            for name, p in self._protected_params():
                p.copy_(torch.where(self.fixed_mask[name], self.fixed_value[name], p))

    def _step(self, loss: torch.Tensor) -> None:
        super()._step(loss)
        self._write_back()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """A plain optimizer over the model (the base's), rebuilt fresh at every boundary."""
        return super()._make_optimizer()

    def _make_router_optimizer(self) -> torch.optim.Optimizer:
        params = [*self.router_trunk.parameters(), *self.router_head.parameters()]
        return torch.optim.Adam(params, lr=self.router_lr)

    # -- learning ------------------------------------------------------------------------------
    def learn(self, batch: Batch) -> StepResult:
        self.model.train()
        losses, outcome = self._forward(batch.x, batch.y)
        self._step(losses.mean())
        self.task_buffer.add(batch.x, batch.y, self.generator)
        self._ensure_task(batch.task)
        task_y = torch.full_like(batch.y, batch.task)
        self.reservoirs[batch.task].add(batch.x, task_y, self.generator)
        self._router_step(batch.x, task_y)
        return outcome

    def _ensure_task(self, task: int) -> None:
        super()._ensure_task(task)
        if not hasattr(self, "reservoirs"):
            return  # during the base constructor
        while len(self.reservoirs) < len(self.task_classes):
            self.reservoirs.append(ReservoirBuffer(self.router_reservoir_size, self.input_shape, self.device))
        if self.router_head.n_classes < len(self.task_classes):
            self.router_head.grow(len(self.task_classes) - self.router_head.n_classes, self.generator)
            self.router_optimizer = self._make_router_optimizer()

    def _router_step(self, x: torch.Tensor, task_y: torch.Tensor) -> None:
        """One router step on the batch plus as many replayed samples from each other task's reservoir."""
        others = [r for t, r in enumerate(self.reservoirs) if len(r) and t != int(task_y[0])]
        if not others:
            return  # one task only: routing is trivial, nothing to learn yet
        per = x.shape[0]  # as many from each old task as from the stream: balanced tasks
        xs, ys = [x], [task_y]
        for r in others:
            rx, ry = r.sample(per, self.generator)
            xs.append(rx)
            ys.append(ry)
        self._router_update(torch.cat(xs), torch.cat(ys))

    def _router_update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.router_trunk.train()
        logits = self.router_head(self.router_trunk(x))
        loss = F.cross_entropy(logits, y)
        self.router_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.router_optimizer.step()

    # -- boundaries: consolidation -------------------------------------------------------------
    def on_boundary(self, event: Boundary) -> None:
        """Consolidate the finished task (if it learned anything), retrain the router, start fresh."""
        task = self.current_task
        if len(self.task_buffer) and task < len(self.task_classes) and self.task_classes[task]:
            self._consolidate(task)
        super().on_boundary(event)
        self.task_buffer = ReservoirBuffer(self.task_buffer_size, self.input_shape, self.device)
        self._rebuild_optimizer()  # fresh per task: no moment of a now-fixed entry survives
        self._retrain_router()

    def _consolidate(self, task: int) -> None:
        x, y = self.task_buffer.inputs().clone(), self.task_buffer.y[: len(self.task_buffer)].clone()
        classes = list(self.task_classes[task])
        pruned = [torch.zeros(layer.units, dtype=torch.bool) for layer in self.layers]
        best = self._buffer_accuracy(x, y, classes)
        for _ in range(self.max_prune_steps):
            candidates = self._prune_candidates(x, y, pruned)
            if not candidates:
                break
            saved = self._save_params(), [p.clone() for p in pruned]
            for layer_index, units in candidates:
                pruned[layer_index][units] = True
            self._apply_pruned(pruned)
            self._recover(x, y)
            accuracy = self._buffer_accuracy(x, y, classes)
            if accuracy < best * (1 - self.tol):
                self._load_params(saved[0])
                pruned = saved[1]
                self._apply_pruned(pruned)
                break
            best = max(best, accuracy)
        self._take_ownership(task, pruned)
        self._store_task_head(task)

    def _buffer_accuracy(self, x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> float:
        proba, _ = Strategy._predict_with(self.model, [classes], x, 0)
        return float((proba.argmax(1) == y).float().mean())

    def _alive_free(self, pruned: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(rank == FREE) & ~p for rank, p in zip(self.rank, pruned, strict=True)]

    def _prune_candidates(
        self, x: torch.Tensor, y: torch.Tensor, pruned: list[torch.Tensor]
    ) -> list[tuple[int, torch.Tensor]]:
        """Per layer, the lowest-scoring `prune_step` fraction of the alive free units (keeping one)."""
        scores = self._scores(x, y)
        out = []
        for i, alive in enumerate(self._alive_free(pruned)):
            idx = alive.nonzero().flatten()
            k = min(len(idx) - 1, max(1, int(len(idx) * self.prune_step)))
            if k <= 0:
                continue
            order = scores[i][idx].argsort(stable=True)
            out.append((i, idx[order[:k]]))
        return out

    def _scores(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if self.score in ("l1", "l2"):
            p = 1 if self.score == "l1" else 2
            return [layer.module.weight.detach().flatten(1).norm(p=p, dim=1).cpu() for layer in self.layers]
        # Taylor: |activation · dL/dactivation|, summed over positions, averaged over the buffer.
        acts: list[torch.Tensor] = []
        handles = [
            layer.module.register_forward_hook(lambda m, i, o: acts.append(o)) for layer in self.layers
        ]
        try:
            self.model.eval()
            loss = self._loss(self.model(x), y).mean()
            for a in acts:
                a.retain_grad()
            loss.backward()
        finally:
            for h in handles:
                h.remove()
            self.model.zero_grad(set_to_none=True)
        out = []
        for a in acts:
            g = a.grad if a.grad is not None else torch.zeros_like(a)
            s = (a * g).detach()
            s = s.flatten(2).sum(2) if s.dim() == 4 else s
            out.append(s.abs().mean(0).cpu())
        return out

    def _apply_pruned(self, pruned: list[torch.Tensor]) -> None:
        """Silence pruned units: their incoming row, bias and norm γ/β are fixed at zero (output 0)."""
        owned = {name: self._owned_mask(name) for name in self.fixed_mask}
        for name, p in self._protected_params():
            layer_index = int(name.split(".")[0])
            rows = pruned[layer_index].to(p.device)
            row_mask = rows.view(-1, *([1] * (p.dim() - 1))).expand_as(p)
            self.fixed_mask[name].copy_(owned[name] | row_mask)
            self.fixed_value[name].masked_fill_(row_mask, 0.0)
        self._write_back()

    def _owned_mask(self, name: str) -> torch.Tensor:
        rank = self.rank[int(name.split(".")[0])]
        p = self.fixed_value[name]
        return (rank != FREE).to(p.device).view(-1, *([1] * (p.dim() - 1))).expand_as(p).clone()

    def _recover(self, x: torch.Tensor, y: torch.Tensor) -> None:
        bs = self.model_config.batch_size
        self.model.train()
        for _ in range(self.recovery_steps):
            idx = torch.randint(x.shape[0], (min(bs, x.shape[0]),), generator=self.generator).to(x.device)
            losses = self._loss(self.model(x[idx]), y[idx])
            self._step(losses.mean())

    def _save_params(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return state

    def _load_params(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        self._rebuild_optimizer()

    def _take_ownership(self, task: int, pruned: list[torch.Tensor]) -> None:
        """Survivors become rank k's; their synapses from units of no rank ≤ k are fixed at zero."""
        k = len(self.consolidations)
        self.consolidations.append(task)
        for i, alive in enumerate(self._alive_free(pruned)):
            self.rank[i][alive] = k
        readable_prev: torch.Tensor | None = None  # units of the previous layer an owned unit may read
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                owned = self.rank[i] != FREE
                w = layer.module.weight
                if readable_prev is not None:
                    cols = readable_prev.repeat_interleave(layer.group).to(w.device)
                    cols = cols.view(1, -1, *([1] * (w.dim() - 2))).expand_as(w)
                    newly = (self.rank[i] == k).to(w.device).view(-1, *([1] * (w.dim() - 1))).expand_as(w)
                    w.masked_fill_(newly & ~cols, 0.0)
                readable_prev = owned
                for name, p in self._protected_params():
                    if int(name.split(".")[0]) == i:
                        self.fixed_mask[name].copy_(self._owned_mask(name))
                        self.fixed_value[name].copy_(torch.where(self.fixed_mask[name], p.detach(), 0.0))
                if layer.norm is not None:
                    frozen = layer.norm.frozen_channels()
                    frozen.copy_(owned.to(frozen.device))
        self._reinit_free()
        free = self.free_capacity_ratio()
        self.log.info("eidetic_consolidated", task=task, rank=k, free_capacity_ratio=round(free, 4))
        if not bool((self.rank[-1] == FREE).any()):
            self.exhausted = True
            self.log.warning(
                "capacity_exhausted",
                task=task,
                free_capacity_ratio=round(free, 4),
                detail="no free neuron reaches the head; later tasks train only their head rows",
            )

    def _reinit_free(self) -> None:
        """Pruned (free) units start over with a default initialization: capacity for the next task."""
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                free = (self.rank[i] == FREE).to(layer.module.weight.device)
                if not bool(free.any()):
                    continue
                w = layer.module.weight
                fresh = torch.empty_like(w)
                fan_in = w[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                fresh.uniform_(-bound, bound, generator=_gen_for(self.generator, w.device))
                w[free] = fresh[free]
                if layer.module.bias is not None:
                    b = torch.empty_like(layer.module.bias).uniform_(
                        -bound, bound, generator=_gen_for(self.generator, w.device)
                    )
                    layer.module.bias[free] = b[free]
                if layer.norm is not None:
                    layer.norm.weight[free] = 1.0
                    layer.norm.bias[free] = 0.0
                    assert layer.norm.running_mean is not None and layer.norm.running_var is not None
                    layer.norm.running_mean[free] = 0.0
                    layer.norm.running_var[free] = 1.0
        self._write_back()

    def _store_task_head(self, task: int) -> None:
        """Copy the task's head rows, reading only owned features, for exact task-hinted prediction."""
        classes = list(self.task_classes[task])
        owned = (self.rank[-1] != FREE).to(self.device)
        head = self.model.head
        with torch.no_grad():
            w = head.weight[classes].detach().clone() * owned.to(head.weight.dtype)
            b = head.bias[classes].detach().clone()
        self.task_heads[task] = (classes, w, b)

    def _retrain_router(self) -> None:
        filled = [t for t, r in enumerate(self.reservoirs) if len(r)]
        if len(filled) < 2:
            return
        xs = torch.cat([self.reservoirs[t].inputs() for t in filled])
        ys = torch.cat([self.reservoirs[t].y[: len(self.reservoirs[t])] for t in filled])
        bs = max(self.model_config.batch_size, 2 * len(filled))
        for _ in range(self.router_epochs):
            order = torch.randperm(len(ys), generator=self.generator).to(ys.device)
            for i in range(0, len(ys), bs):
                idx = order[i : i + bs]
                self._router_update(xs[idx], ys[idx])

    # -- capacity ------------------------------------------------------------------------------
    def free_capacity_ratio(self) -> float:
        """Fraction of protected neurons no task owns yet (exported as stream_cl_free_capacity_ratio)."""
        total = sum(r.numel() for r in self.rank)
        return float(sum(int((r == FREE).sum()) for r in self.rank) / total) if total else 0.0

    # -- prediction ----------------------------------------------------------------------------
    def predict_proba(
        self, x: torch.Tensor, task: int | None = None
    ) -> tuple[torch.Tensor, list[int | None]]:
        return _route_and_predict(
            self.model, self.router_trunk, self.router_head, self.task_classes, self.task_heads, x, task
        )

    def predictor(self) -> Any:
        model = copy.deepcopy(self.model).eval()
        trunk = copy.deepcopy(self.router_trunk).eval()
        router = copy.deepcopy(self.router_head).eval()
        for p in [*model.parameters(), *trunk.parameters(), *router.parameters()]:
            p.requires_grad_(False)
        task_classes = [list(c) for c in self.task_classes]
        heads = {t: (list(c), w.clone(), b.clone()) for t, (c, w, b) in self.task_heads.items()}

        def predict(x: torch.Tensor, task: int | None) -> tuple[torch.Tensor, list[int | None]]:
            return _route_and_predict(model, trunk, router, task_classes, heads, x, task)

        return predict

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "rank": [r.clone() for r in self.rank],
            "consolidations": list(self.consolidations),
            "fixed_mask": {k: v.cpu().clone() for k, v in self.fixed_mask.items()},
            "fixed_value": {k: v.cpu().clone() for k, v in self.fixed_value.items()},
            "task_heads": {
                t: {"classes": list(c), "weight": w.cpu().clone(), "bias": b.cpu().clone()}
                for t, (c, w, b) in self.task_heads.items()
            },
            "task_buffer": self.task_buffer.state_dict(),
            "reservoirs": [r.state_dict() for r in self.reservoirs],
            "router_trunk": {k: v.cpu().clone() for k, v in self.router_trunk.state_dict().items()},
            "router_tasks": self.router_head.n_classes,
            "router_head": {k: v.cpu().clone() for k, v in self.router_head.state_dict().items()},
            "router_optimizer": _cpu(self.router_optimizer.state_dict()),
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for r, saved in zip(self.rank, state["rank"], strict=True):
            r.copy_(saved)
        self.consolidations = list(state["consolidations"])
        for k, v in state["fixed_mask"].items():
            self.fixed_mask[k].copy_(v)
        for k, v in state["fixed_value"].items():
            self.fixed_value[k].copy_(v)
        self.task_heads = {
            int(t): (list(h["classes"]), h["weight"].to(self.device), h["bias"].to(self.device))
            for t, h in state["task_heads"].items()
        }
        self.task_buffer.load_state_dict(state["task_buffer"])
        self.reservoirs = []
        for saved in state["reservoirs"]:
            reservoir = ReservoirBuffer(self.router_reservoir_size, self.input_shape, self.device)
            reservoir.load_state_dict(saved)
            self.reservoirs.append(reservoir)
        self.router_trunk.load_state_dict(state["router_trunk"])
        grow = state["router_tasks"] - self.router_head.n_classes
        if grow > 0:
            self.router_head.grow(grow)
        self.router_head.load_state_dict(state["router_head"])
        self.router_optimizer = self._make_router_optimizer()
        self.router_optimizer.load_state_dict(state["router_optimizer"])
        self.exhausted = bool(state["exhausted"])

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        return {
            **super().memory_usage(),
            "task_buffer": (len(self.task_buffer), self.task_buffer.capacity),
            **{f"router_reservoir.{t}": (len(r), r.capacity) for t, r in enumerate(self.reservoirs)},
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hooks"] = []  # hook handles do not pickle; parameters lose their hooks anyway
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._install_hooks()


def _route_and_predict(
    model: Classifier,
    trunk: nn.Module,
    router: ExpandingHead,
    task_classes: list[list[int]],
    task_heads: Mapping[int, tuple[list[int], torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    task: int | None,
) -> tuple[torch.Tensor, list[int | None]]:
    """Class probabilities through a task's head: the hinted task, else the router's choice per sample.

    A consolidated task predicts with its stored head (bit-identical forever); the current task
    with the live head restricted to its classes.
    """
    n = x.shape[0]
    known = [t for t, c in enumerate(task_classes) if c]
    if task is None and not known:
        return Strategy._predict_with(model, task_classes, x, None)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model.features(x)
        live = model.head(features)
        if task is not None:
            routes = [task] * n
        elif len(known) == 1 or router.n_classes < len(task_classes):
            routes = [known[-1]] * n
        else:
            trunk.eval()
            logits = router(trunk(x))
            allowed = torch.full_like(logits, float("-inf"))
            allowed[:, known] = 0.0
            routes = [int(r) for r in (logits + allowed).argmax(1)]
    model.train(was_training)
    if live.shape[1] == 0:
        return live.new_zeros((n, 0)), list(routes)
    out = torch.full_like(live, float("-inf"))
    for t in sorted(set(routes)):
        rows = torch.tensor([i for i, r in enumerate(routes) if r == t], device=live.device)
        if t is None or t >= len(task_classes) or not task_classes[t]:
            out[rows] = live[rows]
            continue
        stored = task_heads.get(t)
        if stored is not None and stored[0] == task_classes[t]:
            classes, w, b = stored
            out[rows.view(-1, 1), torch.tensor(classes, device=live.device)] = F.linear(features[rows], w, b)
        else:
            classes = task_classes[t]
            idx = torch.tensor(classes, device=live.device)
            out[rows.view(-1, 1), idx] = live[rows.view(-1, 1), idx]
    return torch.softmax(out, dim=1), list(routes)


def _gen_for(generator: torch.Generator, device: torch.device) -> torch.Generator | None:
    """The strategy's CPU generator where it can be used (CPU tensors); else the device's default."""
    return generator if device.type == "cpu" else None


def _cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj
