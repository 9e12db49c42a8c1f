"""Interval arithmetic for the `interval` strategy: a chunked hypernetwork and its target MLP.

Everything here is a pure function of tensors (no strategy state), so soundness can be tested on
its own. Two kinds of interval propagation:

- through the hypernetwork `H` (any sign of inputs): midpoint/radius form, `μ ← Wμ + b`,
  `r ← |W| r`, and ReLU on the bounds. The embedding box becomes a box of target weights;
- through the target MLP, where inputs are non-negative (pixels in [0, 1], then ReLU outputs):
  for `x ∈ [x_L, x_U]`, `x ≥ 0`, and weights `W ∈ [W_L, W_U]`,
  `lower = x_L W_L⁺ + x_U W_L⁻`, `upper = x_U W_U⁺ + x_L W_U⁻` (`w⁺ = max(w, 0)`,
  `w⁻ = min(w, 0)`). This is exact per product and cheaper than the general (sign-split) form,
  which is why the strategy insists on non-negative inputs.

Size: the last layer of a plain hypernetwork is `hidden × |θ|`, which for a 784-256-256 target
(≈270k weights) would be 27M parameters. `H` is therefore *chunked* (HNET, von Oswald et al.):
it maps `[e, c_k]` — the task embedding and a learned chunk embedding `c_k` — to chunk `k` of
`θ`, so its last layer is `hidden × chunk_size` whatever the target's size. Its output bias is
kept per weight (`|θ|` parameters, the size of the target itself), as in an unchunked
hypernetwork: `θ = b + s ⊙ chunks(e)` (`s` the fan-in scale). The bias is a point, so the
interval propagation adds it to both bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.strategies.backbones import MLP


def ibp_linear(
    mu: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box `[mu − radius, mu + radius]` through `x ↦ W x + b` (any signs)."""
    return F.linear(mu, weight, bias), F.linear(radius, weight.abs())


def ibp_relu(mu: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box through ReLU: ReLU is monotone, so the bounds map to bounds."""
    lower, upper = F.relu(mu - radius), F.relu(mu + radius)
    return (upper + lower) / 2, (upper - lower) / 2


def interval_linear_nonneg(
    x_lo: torch.Tensor,
    x_hi: torch.Tensor,
    w_lo: torch.Tensor,
    w_hi: torch.Tensor,
    b_lo: torch.Tensor,
    b_hi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sound bounds of `W x + b` for `0 ≤ x_lo ≤ x ≤ x_hi` and elementwise weight/bias boxes.

    With `x ≥ 0`, `w·x ≥ W_L·x` for every `w ≥ W_L`, and `W_L·x` is smallest at `x_L` where
    `W_L > 0` and at `x_U` where `W_L < 0`; the upper bound is the mirror image.
    """
    lower = F.linear(x_lo, w_lo.clamp(min=0)) + F.linear(x_hi, w_lo.clamp(max=0)) + b_lo
    upper = F.linear(x_hi, w_hi.clamp(min=0)) + F.linear(x_lo, w_hi.clamp(max=0)) + b_hi
    return lower, upper


def nested_centres(embeddings: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, float]:
    """Box centres `σ·cos(e)` (`σ = ε/2M`) and the box radius `ε/M` of the nested variant.

    Every centre lies in `[−σ, σ]^M` and the radius is `2σ`, so every box contains `[−σ, σ]^M`:
    the intersection of all task boxes is never empty, whatever the embeddings learn.
    """
    m = embeddings.shape[-1]
    return (epsilon / (2 * m)) * torch.cos(embeddings), epsilon / m


def universal_embedding(centres: torch.Tensor, radius: float) -> torch.Tensor:
    """The midpoint of the intersection of the boxes `[c_t − radius, c_t + radius]` (rows of `centres`)."""
    lower = (centres - radius).max(dim=0).values
    upper = (centres + radius).min(dim=0).values
    return (lower + upper) / 2


class TargetLayout:
    """Where each Linear layer of the target MLP lives in the flat weight vector `θ`.

    The target is `Flatten → (Linear → ReLU)*` with widths `sizes` (input first), i.e. exactly the
    `MLP` backbone; generated weights are written into such an `MLP` for serving.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.shapes = [(int(o), int(i)) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        self.n_weights = sum(o * i + o for o, i in self.shapes)

    def fan_in_scale(self) -> torch.Tensor:
        """`1/√fan_in` per weight, so a default-initialized `H` yields a sensibly scaled target."""
        parts = [torch.full((o * i + o,), 1.0 / math.sqrt(i)) for o, i in self.shapes]
        return torch.cat(parts)

    def default_init(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A flat `θ` drawn like PyTorch's `nn.Linear` initialization: `U(−1/√fan_in, 1/√fan_in)`."""
        parts = [(2 * torch.rand(o * i + o, generator=generator) - 1) / math.sqrt(i) for o, i in self.shapes]
        return torch.cat(parts) if parts else torch.zeros(0)

    def split(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`θ` [n_weights] as [(W [out, in], b [out])] per layer (views)."""
        layers, start = [], 0
        for o, i in self.shapes:
            w = theta[start : start + o * i].view(o, i)
            b = theta[start + o * i : start + o * i + o]
            layers.append((w, b))
            start += o * i + o
        return layers

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Features of the target MLP with weights `θ` (the ordinary forward pass)."""
        h = x.flatten(1)
        for w, b in self.split(theta):
            h = F.relu(F.linear(h, w, b))
        return h

    def bounds(
        self, x_lo: torch.Tensor, x_hi: torch.Tensor, theta_lo: torch.Tensor, theta_hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature bounds for inputs in `[x_lo, x_hi]` (non-negative) and weights in `[θ_lo, θ_hi]`."""
        lo, hi = x_lo.flatten(1), x_hi.flatten(1)
        for (wl, bl), (wh, bh) in zip(self.split(theta_lo), self.split(theta_hi), strict=True):
            lo, hi = interval_linear_nonneg(lo, hi, wl, wh, bl, bh)
            lo, hi = F.relu(lo), F.relu(hi)  # ReLU keeps the next layer's inputs non-negative
        return lo, hi


class HyperNetwork(nn.Module):
    """`H([e, c_k]) → chunk k of θ`: a ReLU MLP over the task embedding and a chunk embedding.

    Also owns the per-task embeddings (`embeddings`, one row per task slot), so the optimizer,
    checkpoints and pickling handle them with the rest of the model.
    """

    def __init__(
        self,
        layout: TargetLayout,
        embedding_dim: int,
        hidden: Sequence[int],
        chunk_size: int,
        chunk_dim: int,
        n_slots: int,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.chunk_size = min(chunk_size, layout.n_weights)
        self.n_chunks = math.ceil(layout.n_weights / self.chunk_size)
        self.embeddings = nn.Parameter(torch.randn(n_slots, embedding_dim))
        self.chunk_embeddings = nn.Parameter(torch.randn(self.n_chunks, chunk_dim))
        widths = [embedding_dim + chunk_dim, *hidden, self.chunk_size]
        self.layers: list[nn.Linear] = nn.ModuleList(  # type: ignore[assignment]
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.scale: torch.Tensor
        self.register_buffer("scale", layout.fan_in_scale(), persistent=False)
        # The output layer's bias, one per target weight, as in an unchunked hypernetwork (whose
        # last layer has a row and a bias per weight): chunking shares the last layer's rows across
        # chunks, and without a per-weight bias every Adam step moves whole chunks coherently (measured:
        # new tasks stuck at chance in a one-pass stream). Starts at PyTorch's Linear initialization.
        self.bias = nn.Parameter(layout.default_init())

    def _inputs(self, e: torch.Tensor) -> torch.Tensor:
        """[n, M] embeddings → [n, n_chunks, M + chunk_dim] hypernetwork inputs."""
        n = e.shape[0]
        chunks = self.chunk_embeddings.unsqueeze(0).expand(n, -1, -1)
        return torch.cat([e.unsqueeze(1).expand(-1, self.n_chunks, -1), chunks], dim=2)

    def _to_delta(self, out: torch.Tensor) -> torch.Tensor:
        return out.flatten(1)[:, : self.layout.n_weights] * self.scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Target weights [n, n_weights] for embeddings `e` [n, M]."""
        h = self._inputs(e)
        for k, layer in enumerate(self.layers):
            h = layer(h)
            if k < len(self.layers) - 1:
                h = F.relu(h)
        return self.bias + self._to_delta(h)

    def bounds(self, centre: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight box `[θ_L, θ_U]` for the embedding box `centre ± radius` (centre [M])."""
        mu = self._inputs(centre.unsqueeze(0))
        r = torch.zeros_like(mu)
        r[..., : centre.shape[0]] = radius  # chunk embeddings are points
        for k, layer in enumerate(self.layers):
            mu, r = ibp_linear(mu, r, layer.weight, layer.bias)
            if k < len(self.layers) - 1:
                mu, r = ibp_relu(mu, r)
        mu, r = self.bias + self._to_delta(mu)[0], self._to_delta(r)[0]  # the scale is positive
        return mu - r, mu + r


def write_mlp(backbone: nn.Module, layout: TargetLayout, theta: torch.Tensor) -> None:
    """Copy the flat weights `θ` into an `MLP`'s Linear layers, in order."""
    assert isinstance(backbone, MLP)
    linears = [m for m in backbone.body if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, (w, b) in zip(linears, layout.split(theta), strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
