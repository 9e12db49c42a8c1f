"""The diagonal empirical Fisher of one task, `interval`'s regularizer metric (`importance = "fisher"`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from stream_cl.strategies.interval.bounds import TargetLayout

_CHUNK = 64  # samples per vectorized per-sample gradient

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample losses


def diagonal_fisher(
    layout: TargetLayout,
    loss_fn: Loss,
    theta: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the loss w.r.t. the generated weights `theta` and the head (`w`,
    `b`), squared and summed over the samples; scaled so the mean over `theta` is 1, which keeps
    `beta` on the scale of the plain L2 regularizer."""

    def loss(
        theta: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        logits = F.linear(layout.forward(x.unsqueeze(0), theta), w, b)
        return loss_fn(logits, y.unsqueeze(0)).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0, 0))
    f_theta, f_w, f_b = torch.zeros_like(theta), torch.zeros_like(w), torch.zeros_like(b)
    for i in range(0, len(y), _CHUNK):
        g_theta, g_w, g_b = grads(theta, w, b, x[i : i + _CHUNK], y[i : i + _CHUNK])
        f_theta += (g_theta**2).sum(0)
        f_w += (g_w**2).sum(0)
        f_b += (g_b**2).sum(0)
    scale = 1.0 / float(f_theta.mean()) if float(f_theta.mean()) > 0 else 0.0
    return f_theta * scale, f_w * scale, f_b * scale
