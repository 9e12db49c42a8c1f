"""How `eidetic` picks the neurons a finished task keeps: a search by cheap probes, then one recovery.

A task ends having learned on every free neuron; it should keep only the few it needs, leaving the
rest free for later tasks. A probe asks: keeping only the top `fraction` of each layer's free
neurons (ranked by their pruning score), how well does a head fitted in closed form answer the
task's buffer? It is one forward pass of (up to `PROBE_SAMPLES` of) the buffer with the other free
neurons' outputs masked to zero, and a ridge regression onto the task's classes over the features
left (those of earlier tasks' neurons included): no gradient step. Fractions 1/2^k are probed from
the smallest (one neuron per layer) up, and the first within `probe_tol` of keeping every free
neuron is kept; the probe's head rows start the recovery steps that follow
(`Eidetic._consolidate`), so they refine a working head rather than relearn one.

This replaced a search that pruned a fraction, retrained, checked and undid a failed step, ten
rounds of recovery per boundary: most of a short task's learning time went there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stream_cl.strategies.backbones import Classifier
from stream_cl.strategies.eidetic.masks import FREE, ProtectedLayer

# Buffer samples a probe scores (a random subset when the buffer is larger): enough to tell a
# kept fraction that holds the task from one that does not, at a fraction of a full pass's cost.
PROBE_SAMPLES = 512
_RIDGE = 1e-3  # ridge λ of a probe's closed-form head, relative to the mean feature energy


@dataclass(frozen=True)
class KeptUnits:
    """Per protected layer, which alive free units the task keeps (True) and prunes (False)."""

    fraction: float
    keep: list[torch.Tensor]  # bool [units] per layer; False for owned units too

    def pruned(self, free: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f & ~k for f, k in zip(free, self.keep, strict=True)]


def keep_top(scores: list[torch.Tensor], free: list[torch.Tensor], fraction: float) -> KeptUnits:
    """The top `fraction` (at least one) of each layer's free units by score."""
    keep = []
    for score, is_free in zip(scores, free, strict=True):
        idx = is_free.nonzero().flatten()
        k = max(1, round(len(idx) * fraction)) if len(idx) else 0
        mask = torch.zeros_like(is_free)
        if k:
            order = score[idx].argsort(descending=True, stable=True)
            mask[idx[order[:k]]] = True
        keep.append(mask)
    return KeptUnits(fraction, keep)


def fractions(free: list[torch.Tensor]) -> list[float]:
    """1, 1/2, 1/4, ... until every layer keeps a single free unit."""
    most = max((int(f.sum()) for f in free), default=1)
    out = [1.0]
    while most * out[-1] > 1:
        out.append(out[-1] / 2)
    return out


class Probe:
    """Scores a kept set on the buffer: masked forward pass, closed-form head on the task's classes."""

    def __init__(
        self,
        model: Classifier,
        layers: list[ProtectedLayer],
        rank: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[int],
        generator: torch.Generator,
        samples: int = PROBE_SAMPLES,
    ) -> None:
        self.all_samples = len(x) <= samples  # else a random subset of them
        if len(x) > samples:
            pick = torch.randperm(len(x), generator=generator)[:samples].to(x.device)
            x, y = x[pick], y[pick]
        self.model, self.layers, self.rank = model, layers, rank
        self.x, self.y = x, y
        index = {c: i for i, c in enumerate(classes)}
        self.target = torch.tensor([index.get(int(c), -1) for c in y.tolist()], device=x.device)
        self.n_classes = len(classes)
        # The first protected layer's output on x before its mask, and the versions of that layer's
        # parameters it was computed with: no kept set changes it, so later probes reuse it while
        # the parameters stay as they were (on the default MLP that layer is most of a forward).
        self._first: tuple[tuple[int, ...], torch.Tensor] | None = None
        # The last masked features computed: (the version of every backbone tensor, the masks, the
        # features). Asked again for the same kept set of the same parameters, they are reused.
        self._last: tuple[tuple[int, ...], list[torch.Tensor], torch.Tensor] | None = None

    def fit(self, kept: KeptUnits) -> FittedHead:
        """A ridge head over the features the kept set leaves (owned ones included), and its
        buffer accuracy."""
        f = self.features(kept)
        return fit_ridge_head(f, self._masks(kept)[-1].to(f.device), self.target, self.n_classes)

    def _masks(self, kept: KeptUnits) -> list[torch.Tensor]:
        return [(r != FREE) | k for r, k in zip(self.rank, kept.keep, strict=True)]

    @staticmethod
    def keep_all(free: list[torch.Tensor]) -> KeptUnits:
        """Every free unit kept: what `keep_top` gives at fraction 1, with no scores needed."""
        return KeptUnits(1.0, [is_free.clone() for is_free in free])

    def features(self, kept: KeptUnits) -> torch.Tensor:
        """The model's features of the probe's samples (eval mode) with every free unit the kept
        set leaves out silenced. A unit already fixed at zero output (a pruned one) gives the same
        features silenced or not, so after pruning to `kept` these are the model's own features."""
        masks = self._masks(kept)
        backbone = self.model.backbone
        versions = tuple(t._version for t in (*backbone.parameters(), *backbone.buffers()))
        last = self._last
        if (
            last is not None
            and last[0] == versions
            and all(torch.equal(a, b) for a, b in zip(last[1], masks, strict=True))
        ):
            return last[2]
        first = self.layers[0].module
        versions_first = tuple(p._version for p in first.parameters())
        capture = None
        if self._first is None or self._first[0] != versions_first:
            # Registered before the mask hooks, so it sees the unmasked output.
            capture = first.register_forward_hook(
                lambda m, i, o: setattr(self, "_first", (versions_first, o))
            )
        else:
            cached = self._first[1]
            first.forward = lambda *args, **kwargs: cached  # type: ignore[method-assign]
        handles = [
            (layer.norm if layer.norm is not None else layer.module).register_forward_hook(
                lambda m, i, o, alive=alive: (
                    o * alive.to(o.device, o.dtype).view(1, -1, *([1] * (o.dim() - 2)))
                )
            )
            for layer, alive in zip(self.layers, masks, strict=True)
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                f = self.model.features(self.x)
        finally:
            for h in handles:
                h.remove()
            if capture is not None:
                capture.remove()
            else:
                del first.forward  # the module's own forward again
            self.model.train(was_training)
        self._last = (versions, masks, f)
        return f


@dataclass(frozen=True)
class FittedHead:
    """A closed-form head over the task's classes: rows [classes, feature dim] (zero on the columns
    it may not read) and biases, scaled to confident logits, and its accuracy on the buffer."""

    accuracy: float
    weight: torch.Tensor
    bias: torch.Tensor


# A ridge row outputs about 1 on its class and 0 on the others; scaled, its softmax is as confident
# as a trained head's, so the recovery steps after it refine it rather than relearn it.
_LOGIT_SCALE = 5.0


def fit_ridge_head(
    f: torch.Tensor, readable: torch.Tensor, target: torch.Tensor, n_classes: int
) -> FittedHead:
    """Ridge regression (with intercept) from the `readable` columns of `f` to one-hot `target`."""
    cols = readable.nonzero().flatten()
    z = torch.cat([f[:, cols].double(), f.new_ones((len(f), 1), dtype=torch.float64)], dim=1)
    onehot = torch.zeros((len(f), max(n_classes, 1)), dtype=torch.float64, device=f.device)
    valid = target >= 0
    onehot[valid.nonzero().flatten(), target[valid]] = 1.0
    gram = z.T @ z
    scale = float(gram.diagonal().mean()) or 1.0
    gram += (_RIDGE * scale) * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram, z.T @ onehot)  # [readable + 1, classes]
    accuracy = float(((z @ w).argmax(1) == target).double().mean()) if n_classes > 1 else 1.0
    weight = f.new_zeros((max(n_classes, 1), f.shape[1]))
    weight[:, cols] = (_LOGIT_SCALE * w[:-1]).T.to(f.dtype)
    return FittedHead(accuracy, weight, (_LOGIT_SCALE * w[-1]).to(f.dtype))


def smallest_fraction(
    probe: Probe, scores: list[torch.Tensor], free: list[torch.Tensor], tol: float, max_keep: float = 1.0
) -> tuple[KeptUnits, FittedHead]:
    """The smallest kept fraction whose probe stays within `tol` of keeping every free unit, with
    its fitted head; `max_keep` when none below it does. Fractions are tried from the smallest up:
    a probe's accuracy is not monotone in the fraction (8 kept units can probe worse than 4), so a
    bisection could skip the answer."""
    levels = [f for f in fractions(free) if f < max_keep]
    reference = probe.fit(keep_top(scores, free, 1.0))
    for fraction in reversed(levels):
        kept = keep_top(scores, free, fraction)
        head = probe.fit(kept)
        if head.accuracy >= reference.accuracy * (1 - tol):
            return kept, head
    kept = keep_top(scores, free, max_keep)
    return kept, (reference if max_keep >= 1 else probe.fit(kept))
