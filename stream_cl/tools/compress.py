"""`stream-cl compress`: sparsify a checkpoint's model along a functionally invariant path (FIP's
second use).

Zeroing the p% smallest weights at once (magnitude pruning) changes the network's function;
instead we walk towards the sparse network while holding the function still on a memory of inputs:
each step follows the normalized gradient of

    D(memory) + λ · ½ ||w − w_sparse||²,   w_sparse = w with each layer's p% smallest weights zeroed

(D = the Bhattacharyya distance to the original network's outputs, as in the `fip` strategy), and
`w_sparse` is recomputed every step, so the weights that are to vanish shrink while the rest
compensate. The last step zeroes them exactly, giving the target sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stream_cl.strategies.fip import bhattacharyya, normalized_step

if TYPE_CHECKING:
    import argparse

    from stream_cl.config import Config


def prunable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weight matrices and kernels (biases and norm scales are few and stay dense)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, True where a weight survives: all but its `sparsity` fraction of smallest |w|.

    Per layer rather than global, so that no thin layer is emptied outright."""
    masks = {}
    for name, p in prunable(model):
        k = int(round(sparsity * p.numel()))
        mask = torch.ones_like(p, dtype=torch.bool)
        if k > 0:
            idx = p.detach().abs().flatten().argsort()[:k]
            mask.view(-1)[idx] = False
        masks[name] = mask
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in prunable(model):
            p.mul_(masks[name])


def sparsity_of(model: nn.Module) -> float:
    total = sum(p.numel() for _, p in prunable(model))
    zeros = sum(int((p == 0).sum()) for _, p in prunable(model))
    return zeros / max(1, total)


@dataclass
class CompressResult:
    distance_before_prune: float  # mean D on the memory just before the final zeroing
    distance_after: float  # mean D on the memory, final sparse network
    sparsity: float


def compress(
    model: nn.Module,
    memory_x: torch.Tensor,
    sparsity: float,
    steps: int = 300,
    step_size: float = 0.01,
    lam: float = 1.0,
    batch: int = 128,
    seed: int = 0,
) -> CompressResult:
    """Move `model` (in place) along an FIP towards `sparsity`, then prune it exactly."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    model.eval()  # BatchNorm keeps its statistics: the function held still is the serving one
    with torch.no_grad():
        p_ref = torch.softmax(model(memory_x), dim=1)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(prunable(model))
    for _ in range(steps):
        idx = torch.randperm(len(memory_x), generator=gen)[:batch]
        masks = magnitude_masks(model, sparsity)
        loss = bhattacharyya(torch.softmax(model(memory_x[idx]), dim=1), p_ref[idx]).mean()
        for name, p in named.items():
            loss = loss + 0.5 * lam * ((p * ~masks[name]) ** 2).sum()  # ½||w − w_sparse||²
        for p in params:
            p.grad = None
        loss.backward()
        normalized_step(params, step_size)

    def distance() -> float:
        with torch.no_grad():
            return float(bhattacharyya(torch.softmax(model(memory_x), dim=1), p_ref).mean())

    before = distance()
    apply_masks(model, magnitude_masks(model, sparsity))
    return CompressResult(before, distance(), sparsity_of(model))


def run_command(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """`stream-cl compress`: per-task test accuracy before, after plain magnitude pruning and after
    the path + pruning; the compressed checkpoint goes to `args.out`.

    The memory is the `fip` strategy's own input memory when the checkpoint has one, else
    `--buffer` training inputs of `--stream` (inputs only: the targets are the network's outputs)."""
    import copy

    from stream_cl.store.checkpoints import CheckpointStore
    from stream_cl.tools.transfer import accuracy, fresh_init, load, read_source, stream_buffer

    a = args
    state = read_source(a.checkpoint)
    (buf_x, _), _, per_task = stream_buffer(state, a.stream, a.buffer, a.seed)
    memory = state["strategy"].get("memory")
    shape = tuple(state["input_shape"])
    memory_x = memory["x"].reshape((-1, *shape)) if memory is not None and len(memory["x"]) else buf_x
    model, _ = fresh_init(state, config, 0)
    load(model, state["strategy"]["model"])

    def per_task_accuracy(m: nn.Module) -> list[float]:
        return [round(accuracy(m, x, y), 4) for x, y in per_task]

    before = per_task_accuracy(model)
    magnitude = copy.deepcopy(model)
    apply_masks(magnitude, magnitude_masks(magnitude, a.sparsity))
    result = compress(model, memory_x, a.sparsity, steps=a.steps, step_size=a.step_size, seed=a.seed)
    after = per_task_accuracy(model)
    strategy = dict(state["strategy"])
    strategy["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if isinstance(strategy.get("optimizer"), dict):
        strategy["optimizer"] = {**strategy["optimizer"], "state": {}}
    out = {k: v for k, v in state.items() if k != "format"} | {"strategy": strategy}
    path = CheckpointStore(a.out).save(out)
    return {
        "checkpoint": str(path),
        "sparsity": round(result.sparsity, 4),
        "memory_inputs": len(memory_x),
        "accuracy_per_task": {"before": before, "magnitude_only": per_task_accuracy(magnitude), "fip": after},
        "memory_distance": {"fip": round(result.distance_after, 5)},
    }
