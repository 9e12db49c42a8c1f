"""Neuron ownership for `eidetic` (mask freezing, EideticNet): which task owns which neuron.

`NeuronMasks` holds, for every protected layer (each Linear/Conv2d of the backbone, output units =
neurons), the consolidation that owns each unit (or FREE), and the *fixed* entries of the
parameters with the values they are held at. Fixed entries are never changed by learning:
`zero_fixed_grads` zeroes their gradient before every optimizer step (so no optimizer moment
builds up on them) and `write_back` restores them after it (weight decay adds `λ·p` inside the
step, so it is undone there). Ownership is per unit, so every fixed entry lies in a fixed *row*
(a unit's incoming weights, bias, norm γ/β): both act on the fixed rows' indices alone, a cost
proportional to what is fixed rather than to the whole layer.

- `apply_pruned` silences pruned units while a task is pruned: their incoming row, bias and norm
  γ/β are fixed at zero, so they output 0 and the next layer's column for them reads nothing;
- `take_ownership` makes a task's surviving free units its own: their parameters are fixed at
  their current values, and their synapses from units not owned by this or an earlier task are
  zeroed, so an owned unit reads only fixed units (forward transfer old → new, never back);
- `reinit_free` re-initializes the units no task owns: free capacity for the next task.

BatchNorm channels of owned units always normalize with their stored running statistics, in
training too, and never update them (`FrozenStatsBatchNorm2d`). LayerNorm and GroupNorm mix
units, so `protected_layers` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SCORES = ("l1", "l2", "taylor")
FREE = -1  # rank of a unit no task owns


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


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-unit bool mask [units] broadcast over a parameter's rows (a fresh tensor)."""
    return mask.to(like.device).view(-1, *([1] * (like.dim() - 1))).expand_as(like).clone()


class NeuronMasks:
    """Ownership of every protected unit, and the fixed parameter entries that enforce it."""

    def __init__(self, layers: list[ProtectedLayer]) -> None:
        self.layers = layers
        # rank[l][i]: consolidation number that owns unit i of layer l, or FREE.
        self.rank = [torch.full((layer.units,), FREE, dtype=torch.long) for layer in layers]
        self.fixed_mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params()}
        self.fixed_value = {n: torch.zeros_like(p) for n, p in self.params()}
        self.fixed_rows: dict[str, torch.Tensor] = {}  # name -> indices of the rows fixed_mask covers
        # name -> the values of those rows, gathered once per change of the masks: every optimizer
        # step writes them back, and gathering them again each time cost that step a copy of them.
        self.fixed_rows_value: dict[str, torch.Tensor] = {}
        self._index_rows()

    def params(self) -> list[tuple[str, torch.Tensor]]:
        """The protected parameters by name `<layer>.weight|bias|norm.weight|norm.bias`."""
        params: list[tuple[str, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            params += [(f"{i}.weight", layer.module.weight)]
            if layer.module.bias is not None:
                params += [(f"{i}.bias", layer.module.bias)]
            if layer.norm is not None:
                params += [(f"{i}.norm.weight", layer.norm.weight), (f"{i}.norm.bias", layer.norm.bias)]
        return params

    def _index_rows(self) -> None:
        """Re-derive `fixed_rows` and their values from `fixed_mask` and `fixed_value` (after every
        change of either)."""
        self.fixed_rows, self.fixed_rows_value = {}, {}
        for name, mask in self.fixed_mask.items():
            rows = mask.flatten(1).any(1) if mask.dim() > 1 else mask
            if mask.dim() > 1 and not bool((mask.flatten(1).all(1) == rows).all()):
                raise AssertionError(f"fixed entries of {name} do not form whole rows")
            self.fixed_rows[name] = rows.nonzero().flatten()
            self.fixed_rows_value[name] = self.fixed_value[name].index_select(0, self.fixed_rows[name])

    def zero_fixed_grads(self) -> None:
        """Zero the gradient of every fixed entry (before each optimizer step): no moment builds up."""
        with torch.no_grad():
            for name, p in self.params():
                rows = self.fixed_rows[name]
                if p.grad is not None and rows.numel():
                    p.grad.index_fill_(0, rows, 0.0)

    def write_back(self) -> None:
        """Restore every fixed entry to its stored value (after each optimizer step)."""
        with torch.no_grad():
            for name, p in self.params():
                rows = self.fixed_rows[name]
                if rows.numel():
                    p.index_copy_(0, rows, self.fixed_rows_value[name])

    def owned_mask(self, name: str) -> torch.Tensor:
        rank = self.rank[int(name.split(".")[0])]
        return _rows(rank != FREE, self.fixed_value[name])

    def alive_free(self, pruned: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the units no task owns that are not pruned (yet)."""
        return [(rank == FREE) & ~p for rank, p in zip(self.rank, pruned, strict=True)]

    def apply_pruned(self, pruned: list[torch.Tensor]) -> None:
        """Silence pruned units: their incoming row, bias and norm γ/β are fixed at zero (output 0)."""
        owned = {name: self.owned_mask(name) for name in self.fixed_mask}
        for name, p in self.params():
            row_mask = _rows(pruned[int(name.split(".")[0])], p)
            self.fixed_mask[name].copy_(owned[name] | row_mask)
            self.fixed_value[name].masked_fill_(row_mask, 0.0)
        self._index_rows()
        self.write_back()

    def take_ownership(self, pruned: list[torch.Tensor], k: int) -> None:
        """Alive free units become rank `k`'s; their synapses from units of no rank ≤ k are zeroed.

        Norm channels of owned units freeze their statistics.
        """
        for i, alive in enumerate(self.alive_free(pruned)):
            self.rank[i][alive] = k
        readable_prev: torch.Tensor | None = None  # units of the previous layer an owned unit may read
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                owned = self.rank[i] != FREE
                w = layer.module.weight
                if readable_prev is not None:
                    cols = readable_prev.repeat_interleave(layer.group).to(w.device)
                    cols = cols.view(1, -1, *([1] * (w.dim() - 2))).expand_as(w)
                    w.masked_fill_(_rows(self.rank[i] == k, w) & ~cols, 0.0)
                readable_prev = owned
                for name, p in self.params():
                    if int(name.split(".")[0]) == i:
                        self.fixed_mask[name].copy_(self.owned_mask(name))
                        self.fixed_value[name].copy_(torch.where(self.fixed_mask[name], p.detach(), 0.0))
                if layer.norm is not None:
                    frozen = layer.norm.frozen_channels()
                    frozen.copy_(owned.to(frozen.device))
        self._index_rows()

    def reinit_free(self, generator: torch.Generator) -> None:
        """Units no task owns start over with a default initialization: capacity for the next task."""
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                free = (self.rank[i] == FREE).to(layer.module.weight.device)
                if not bool(free.any()):
                    continue
                w = layer.module.weight
                gen = generator if w.device.type == "cpu" else None
                bound = 1.0 / math.sqrt(w[0].numel())
                w[free] = torch.empty_like(w).uniform_(-bound, bound, generator=gen)[free]
                if layer.module.bias is not None:
                    b = torch.empty_like(layer.module.bias).uniform_(-bound, bound, generator=gen)
                    layer.module.bias[free] = b[free]
                if layer.norm is not None:
                    layer.norm.weight[free] = 1.0
                    layer.norm.bias[free] = 0.0
                    assert layer.norm.running_mean is not None and layer.norm.running_var is not None
                    layer.norm.running_mean[free] = 0.0
                    layer.norm.running_var[free] = 1.0
        self.write_back()

    def free_capacity_ratio(self) -> float:
        """Fraction of protected units no task owns yet."""
        total = sum(r.numel() for r in self.rank)
        return float(sum(int((r == FREE).sum()) for r in self.rank) / total) if total else 0.0

    def owned_features(self) -> torch.Tensor:
        """Bool [feature_dim]: the last layer's units some task owns (what a stored head may read)."""
        return self.rank[-1] != FREE

    def free_units(self) -> list[int]:
        """Per layer, how many units no task owns."""
        return [int((r == FREE).sum()) for r in self.rank]

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": [r.clone() for r in self.rank],
            "fixed_mask": {k: v.cpu().clone() for k, v in self.fixed_mask.items()},
            "fixed_value": {k: v.cpu().clone() for k, v in self.fixed_value.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for r, saved in zip(self.rank, state["rank"], strict=True):
            r.copy_(saved)
        for k, v in state["fixed_mask"].items():
            self.fixed_mask[k].copy_(v)
        for k, v in state["fixed_value"].items():
            self.fixed_value[k].copy_(v)
        self._index_rows()


def unit_scores(
    kind: str,
    layers: list[ProtectedLayer],
    model: nn.Module,
    loss: Callable[[nn.Module], torch.Tensor],
) -> list[torch.Tensor]:
    """Per layer, a pruning score per unit (CPU): the lower, the sooner the unit is pruned.

    l1 / l2: the norm of the unit's incoming weights. taylor: `|a · ∂L/∂a|` summed over positions
    and averaged over the samples, where `loss(model)` computes the mean loss on them.
    """
    if kind in ("l1", "l2"):
        p = 1 if kind == "l1" else 2
        return [layer.module.weight.detach().flatten(1).norm(p=p, dim=1).cpu() for layer in layers]
    acts: list[torch.Tensor] = []
    handles = [layer.module.register_forward_hook(lambda m, i, o: acts.append(o)) for layer in layers]
    try:
        model.eval()
        value = loss(model)
        for a in acts:
            a.retain_grad()
        value.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    out = []
    for a in acts:
        g = a.grad if a.grad is not None else torch.zeros_like(a)
        s = (a * g).detach()
        s = s.flatten(2).sum(2) if s.dim() == 4 else s
        out.append(s.abs().mean(0).cpu())
    return out
