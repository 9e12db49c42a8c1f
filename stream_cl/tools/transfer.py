"""Trajectory transfer (Chijiwa, arXiv 2305.14122): bootstrap a differently
initialized model from the stored endpoints of a learning trajectory plus a small data buffer.

The daemon keeps, per task, the weights when the task started and when it ended
(`TrajectoryRecorder`, saved in checkpoints). Given a source trajectory θ₁⁰ → θ₁ᵀ (taken as
linear with a cosine schedule, `θ₁ᵗ = θ₁⁰ + λ_t (θ₁ᵀ − θ₁⁰)`) and a new initialization θ₂⁰, we
look for a permutation π of hidden units so that `θ₂ᵗ = θ₂⁰ + π(θ₁ᵗ − θ₁⁰)` follows the source.
Why a permutation: networks are symmetric under relabelling their hidden units, so the source's
update only makes sense for the new network once its units are aligned with the source's. The
alignment is found by *gradient matching*: for s = 1…T, the gradients of both networks on the same
batch are collected and π maximizes Σ_t ⟨g₂ᵗ, π(g₁ᵗ)⟩, one hidden layer at a time with the
Hungarian algorithm, sweeping the layers until nothing changes. The step with the best validation
accuracy is kept; BatchNorm statistics (if any) are re-estimated on the buffer at every step, and so
are the hidden units' own statistics (`match_statistics`): an MLP has no BatchNorm to absorb the
difference between θ₂⁰'s units and the source units they take.

Models are `stream_cl.strategies.backbones.Classifier` with an MLP backbone: a chain of `nn.Linear` layers whose
outputs (the hidden units) are permuted, the head's input columns following the last one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.learn.trajectory import Params

if TYPE_CHECKING:
    import argparse

    from stream_cl.config import Config

Perms = list[torch.Tensor]  # one index tensor per hidden layer: new unit i takes source unit perm[i]


def endpoints(state: dict[str, Any], task: int | None = None) -> tuple[Params, Params]:
    """(θ⁰, θᵀ) from a learner checkpoint: the first recorded start → the checkpoint's model, or
    one task's own start → end (its end is the checkpoint's model if it is still in progress)."""
    entries = state.get("trajectory") or []
    current = state["strategy"]["model"]
    if not entries:
        raise ValueError("the checkpoint records no trajectory (written before trajectories were kept?)")
    if task is None:
        return entries[0]["start"], current
    entry = next((e for e in entries if e["task"] == task), None)
    if entry is None:
        raise ValueError(f"task {task} is not among the recorded ones {[e['task'] for e in entries]}")
    return entry["start"], entry["end"] if entry["end"] is not None else current


# -- permutations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """A hidden layer: the parameters whose axis 0 are its units, and those whose axis 1 read them."""

    out: tuple[str, ...]  # e.g. ("backbone.body.1.weight", "backbone.body.1.bias")
    consumers: tuple[str, ...]  # e.g. ("backbone.body.3.weight",)


def mlp_layers(model: nn.Module) -> list[Layer]:
    """The permutable hidden layers of a Classifier whose backbone is a chain of Linear layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, nn.Conv2d | nn.BatchNorm2d) for m in model.modules()):
        raise ValueError("trajectory transfer supports the mlp backbone only")
    layers = [
        Layer((f"{n}.weight", f"{n}.bias"), (f"{nxt}.weight",))
        for n, nxt in zip(names, names[1:], strict=False)
    ]
    layers.append(Layer((f"{names[-1]}.weight", f"{names[-1]}.bias"), ("head.weight",)))
    return layers


def permute(params: Params, layers: Sequence[Layer], perms: Perms) -> Params:
    """π(θ): every layer's units reordered (`out[i] = source[perm[i]]`), consumers' inputs likewise."""
    out = dict(params)
    for layer, perm in zip(layers, perms, strict=True):
        for name in layer.out:
            out[name] = out[name].index_select(0, perm.to(out[name].device))
        for name in layer.consumers:
            out[name] = out[name].index_select(1, perm.to(out[name].device))
    return out


def identity(layers: Sequence[Layer], params: Params) -> Perms:
    return [torch.arange(params[layer.out[0]].shape[0]) for layer in layers]


def match(
    pairs: Sequence[tuple[Params, Params]],
    layers: Sequence[Layer],
    init: Perms | None = None,
    max_sweeps: int = 20,
) -> Perms:
    """π maximizing Σ ⟨a, π(b)⟩ over `pairs` (a: target-side tensors, b: source-side), one layer at
    a time with the Hungarian algorithm (scipy), sweeping until no layer changes.

    For layer l with the others fixed, ⟨a, π(b)⟩ is linear in its permutation matrix:
    A[i, j] = Σ ⟨a_out[i], π_{l−1}(b_out)[j]⟩ + Σ ⟨a_cons[:, i], π_{l+1}(b_cons)[:, j]⟩.
    """
    from scipy.optimize import linear_sum_assignment

    perms = [p.clone() for p in (init or identity(layers, pairs[0][1]))]
    owner = {name: li for li, layer in enumerate(layers) for name in layer.out}
    # Per layer, every term as (a, b, k): all pairs stacked as (units, pairs, rest) with the layer's
    # units first, and k = the layer whose permutation acts on `rest` (None: no other axis, or
    # the head's rows, which are never permuted). Built once: each sweep only re-indexes b.
    terms: list[list[tuple[torch.Tensor, torch.Tensor, int | None]]] = []
    for li, layer in enumerate(layers):
        entries = []
        for name, axis in [(n, 0) for n in layer.out] + [(n, 1) for n in layer.consumers]:
            a = torch.stack([pa[name].movedim(axis, 0) for pa, _ in pairs], dim=1)
            b = torch.stack([pb[name].movedim(axis, 0) for _, pb in pairs], dim=1)
            other = (li - 1 if li > 0 else None) if axis == 0 else owner.get(name)
            entries.append((a, b, other if a.dim() > 2 else None))
        terms.append(entries)
    for _ in range(max_sweeps):
        changed = False
        for li in range(len(layers)):
            cost = None
            for a, b, other in terms[li]:
                if other is not None:
                    b = b.index_select(2, perms[other].to(b.device))
                term = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
                cost = term if cost is None else cost + term
            assert cost is not None
            _, cols = linear_sum_assignment(cost.double().cpu().numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            if not torch.equal(new, perms[li]):
                perms[li] = new
                changed = True
        if not changed:
            break
    return perms


# -- the transfer --------------------------------------------------------------------------------
def _grads(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    load(model, params)
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def load(model: nn.Module, params: Params) -> None:
    """Copy `params` into `model` (buffers not named in `params` are kept)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in params:
                t.copy_(params[name].to(t.device))


def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch: int = 128) -> None:
    """Recompute BatchNorm running statistics on `x` (a no-op without BatchNorm): the transferred
    weights' activations differ from both sources', so neither set of statistics is right."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the buffer
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])


Stats = list[tuple[torch.Tensor, torch.Tensor]]  # per hidden layer: (mean, std) of each unit


def unit_statistics(model: nn.Module, params: Params, layers: Sequence[Layer], x: torch.Tensor) -> Stats:
    """Per hidden layer, the mean and standard deviation over `x` of every unit's pre-activation
    under `params` (`model` is scratch)."""
    load(model, params)
    modules = dict(model.named_modules())
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        modules[layer.out[0].rsplit(".", 1)[0]].register_forward_hook(
            lambda _m, _i, out, li=li: seen.__setitem__(li, out.detach().flatten(1))
        )
        for li, layer in enumerate(layers)
    ]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [(seen[li].mean(0), seen[li].std(0)) for li in range(len(layers))]


def match_statistics(
    model: nn.Module,
    params: Params,
    target: Stats,
    layers: Sequence[Layer],
    perms: Perms,
    x: torch.Tensor,
) -> Params:
    """`params` with every hidden unit's pre-activation on `x` rescaled and shifted to the mean and
    std of the source unit it takes (`target`: the source's `unit_statistics`, in source order;
    unit i takes source unit `perms[l][i]`).

    Why: a permutation carries the source's update but not its initial weights, so a transferred
    unit keeps θ₂⁰'s offset and scale, while the layers above it (mostly the source's update) were
    trained against the source unit's. Where inputs share a large offset (mnist1d min-max scaled to
    [0, 1]: feature mean 0.55, std 0.10), the offset w·x̄ + b dominates every first-layer unit and
    differs from unit to unit of two initializations: the source with only its first layer swapped
    for θ₂⁰'s (matched by activation correlation) drops from 0.39 to chance. This is what BatchNorm
    re-estimation does for a network that has BatchNorm (and REPAIR, Jordan et al. 2022, for
    permuted networks without). Layer by layer: a layer's statistics depend on the ones below."""
    out = dict(params)
    for li, (layer, perm) in enumerate(zip(layers, perms, strict=True)):
        mean, std = unit_statistics(model, out, layers, x)[li]
        want_mean, want_std = target[li][0][perm], target[li][1][perm]
        scale = torch.where(std > 1e-6, want_std / std.clamp_min(1e-6), torch.ones_like(std))
        weight, bias = layer.out
        out[weight] = out[weight] * scale.view(-1, *[1] * (out[weight].dim() - 1))
        out[bias] = (out[bias] - mean) * scale + want_mean
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pad_head(params: Params, like: Params) -> Params:
    """Zero-pad the head rows a start point lacks (classes added later): their update is then the
    whole learned row, carried over as is.

    A task's start is recorded before its classes' rows exist. Zero rows are also the better
    start for matching (measured on split-mnist, seeds 1–3: transferred − naive +10.9/+15.4/+13.8
    points with zeros, −3.8/+0.8/+7.2 with rows drawn like the daemon's `random` policy): at a
    zero head the first gradients are those of the head alone, (p − y)·hᵀ with p uniform, which
    align the last hidden layer's units by their class-conditional activations."""
    out = dict(params)
    for name in ("head.weight", "head.bias"):
        if name in out and out[name].shape != like[name].shape:
            padded = torch.zeros_like(like[name])
            padded[: out[name].shape[0]] = out[name]
            out[name] = padded
    return out


@dataclass
class TransferResult:
    params: Params  # the kept θ₂ˢ
    perms: Perms
    best_step: int
    val_accuracy: list[float]  # per step s = 1…T


def transfer(
    model: nn.Module,
    start: Params,
    end: Params,
    init: Params,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val: tuple[torch.Tensor, torch.Tensor],
    steps: int = 10,
    buffer_x: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TransferResult:
    """Gradient-matching transfer of the trajectory `start → end` onto `init` (all state dicts of
    `model`'s shape; `model` is used as scratch and ends holding the kept weights).

    `batches` yields at least `steps` (x, y) batches; `val` selects the step to keep. With
    `buffer_x`, each θ₂ˢ, once set, has its statistics re-estimated on it (BatchNorm, and each hidden
    unit's by `match_statistics`) before it is validated and kept. The gradients are matched at the
    plain θ₂⁰ + π(θ₁ˢ⁻¹ − θ₁⁰), as the method prescribes: re-estimating there too, towards the
    units of a π not yet found, moves θ₂ off π(θ₁) and spoils the matching (a θ₂⁰ that is an exact
    permutation of θ₁⁰ is then no longer recovered: 5% / 18% of split-mnist's units, against all).
    """
    start, init = pad_head(start, end), pad_head(init, end)
    layers = mlp_layers(model)
    names = [n for n, _ in model.named_parameters()]
    perms = identity(layers, end)
    pairs: list[tuple[Params, Params]] = []
    best: tuple[float, int, Params] = (-1.0, 0, init)
    val_acc: list[float] = []
    it = iter(batches)

    def source(s: int) -> Params:  # θ₁ˢ on the linear trajectory, cosine schedule
        lam = 0.5 * (1.0 - math.cos(math.pi * s / steps))
        return {n: start[n] + lam * (end[n] - start[n]) for n in names}

    def at(theta1: Params, ps: Perms) -> Params:
        moved = permute({n: theta1[n] - start[n] for n in names}, layers, ps)
        return {**init, **{n: init[n] + moved[n] for n in names}}

    for s in range(1, steps + 1):
        x, y = next(it)
        theta1 = source(s - 1)
        g1 = _grads(model, theta1, x, y)
        g2 = _grads(model, at(theta1, perms), x, y)
        pairs.append((g2, g1))
        perms = match(pairs, layers, init=perms)
        theta1 = source(s)
        theta2 = at(theta1, perms)
        if buffer_x is not None:
            target = unit_statistics(model, theta1, layers, buffer_x)
            theta2 = match_statistics(model, theta2, target, layers, perms, buffer_x)
        load(model, theta2)
        if buffer_x is not None:
            reestimate_batchnorm(model, buffer_x)
        acc = accuracy(model, *val)
        val_acc.append(acc)
        if on_step is not None:
            on_step(s, acc)
        if acc > best[0]:
            best = (acc, s, {k: v.detach().clone() for k, v in model.state_dict().items()})
    load(model, best[2])
    return TransferResult(params=best[2], perms=perms, best_step=best[1], val_accuracy=val_acc)


def naive(start: Params, end: Params, init: Params) -> Params:
    """The identity permutation: θ₂⁰ + (θ₁ᵀ − θ₁⁰), what transfer is measured against."""
    start, init = pad_head(start, end), pad_head(init, end)
    return {n: init[n] + (end[n] - start[n]) if n in start else init[n] for n in init}


# -- checkpoint to checkpoint (the `stream-cl transfer` verb) ------------------------------------
def fresh_init(state: dict[str, Any], config: Config, seed: int) -> tuple[nn.Module, Params]:
    """A Classifier shaped like the checkpoint's model (`config.model`'s backbone and widths),
    initialized from `seed` as the daemon would; head rows drawn the same way."""
    from stream_cl.strategies.backbones import Classifier, build_backbone

    shape = tuple(state["input_shape"])
    n_classes = int(state["strategy"]["n_classes"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(config.model.backbone, shape, config.model.hidden)
        model = Classifier(backbone, backbone.feature_dim)
    model.head.grow(n_classes, torch.Generator().manual_seed(seed + 1))
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    source = state["strategy"]["model"]
    for name, t in params.items():
        if name not in source or source[name].shape != t.shape:
            raise ValueError(
                f"model.{name}: shape {tuple(t.shape)} from the config does not match the checkpoint's "
                f"{tuple(source[name].shape) if name in source else 'missing'} (set model.hidden/backbone)"
            )
    return model, params


def stream_buffer(
    state: dict[str, Any], stream_name: str, size: int, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[Any]]:
    """`size` training samples of a built-in stream, drawn across all its tasks and mapped to the
    checkpoint's class indices (labels it never saw are dropped), plus its test split per task.

    Returns (buffer, test, per-task test sets)."""
    import numpy as np

    from stream_cl.tools.datasets import load_stream

    stream = load_stream(stream_name, seed=0)
    index = {label: i for i, label in enumerate(state["labels"])}
    shape = tuple(state["input_shape"])

    def mapped(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        keep = np.array([int(c) in index for c in y], dtype=bool)
        xs = torch.from_numpy(np.ascontiguousarray(x[keep])).reshape((-1, *shape)).float()
        ys = torch.tensor([index[int(c)] for c in y[keep]], dtype=torch.long)
        return xs, ys

    train_x = np.concatenate([t.train_x for t in stream.tasks])
    train_y = np.concatenate([t.train_y for t in stream.tasks])
    pick = np.random.default_rng(seed).permutation(len(train_y))[:size]
    test = stream.all_test()
    per_task = [mapped(t.test_x, t.test_y) for t in stream.tasks]
    return mapped(train_x[pick], train_y[pick]), mapped(test.x, test.y), per_task


def batches_of(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches of (x, y)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - size + 1, size):
            idx = order[i : i + size]
            yield x[idx], y[idx]


def transfer_checkpoint(
    state: dict[str, Any],
    config: Config,
    seed: int,
    buffer: tuple[torch.Tensor, torch.Tensor],
    steps: int = 10,
    task: int | None = None,
    init: Params | None = None,
    batch_size: int = 128,
    val_fraction: float = 0.2,
) -> tuple[dict[str, Any], TransferResult, nn.Module]:
    """A new learner checkpoint state whose model is the trajectory transferred onto a fresh
    initialization (`seed`, or `init`); everything else (labels, offsets, detector, buffers) is the
    source's, so the daemon resumes the same stream with the new weights. Optimizer moments
    belong to the old weights and are dropped."""
    start, end = endpoints(state, task)
    model, fresh = fresh_init(state, config, seed)
    theta0 = fresh if init is None else init
    x, y = buffer
    n_val = max(1, int(len(y) * val_fraction))
    val, train = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
    result = transfer(
        model,
        start,
        end,
        theta0,
        batches_of(*train, min(batch_size, len(train[1])), seed),
        val,
        steps=steps,
        buffer_x=train[0],
    )
    strategy = dict(state["strategy"])
    strategy["model"] = {k: v.detach().cpu().clone() for k, v in result.params.items()}
    optimizer = strategy.get("optimizer")
    if isinstance(optimizer, dict):
        strategy["optimizer"] = {**optimizer, "state": {}}
    out = {**state, "strategy": strategy, "trajectory": []}
    out.pop("format", None)
    return out, result, model


def read_source(path: str) -> dict[str, Any]:
    """A checkpoint file, or the newest valid one in a directory."""
    from pathlib import Path

    from stream_cl.store.checkpoints import CheckpointError, CheckpointStore, read_checkpoint

    if Path(path).is_dir():
        found = CheckpointStore(path).load_latest()
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path}")
        return found[0]
    return read_checkpoint(path)


def run_command(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """`stream-cl transfer`: transfer, score source / transferred / naive / fresh on the stream's
    test split, write the new checkpoint into `args.out`; returns the report."""
    from stream_cl.store.checkpoints import CheckpointStore

    state = read_source(args.checkpoint)
    init = None
    if args.init:
        init = {k: v.clone() for k, v in read_source(args.init)["strategy"]["model"].items()}
    buffer, test, _ = stream_buffer(state, args.stream, args.buffer, args.seed)
    out, result, model = transfer_checkpoint(
        state, config, args.seed, buffer, steps=args.steps, task=args.task, init=init
    )
    start, end = endpoints(state, args.task)
    scratch, fresh = fresh_init(state, config, args.seed)
    theta0 = fresh if init is None else init
    scores = {}
    for label, params in (("source", end), ("naive", naive(start, end, theta0)), ("init", theta0)):
        load(scratch, pad_head(params, end))
        scores[label] = accuracy(scratch, *test)
    scores["transferred"] = accuracy(model, *test)
    path = CheckpointStore(args.out).save(out)
    return {
        "checkpoint": str(path),
        "test_accuracy": scores,
        "best_step": result.best_step,
        "val_accuracy": result.val_accuracy,
    }
