"""Head policies: how the classifier rows of new classes start, and whether old rows freeze.

A head policy composes with every protection strategy: the `Strategy` base computes each learn
step's penultimate features once and hands the stream batch's part to `observe`, and tells the
policy when classes appear; protection strategies never know which policy is in use.

- `random`      PyTorch's default Linear init (the draw `ExpandingHead.grow` makes);
- `class_mean`  the row points along the mean of the class's L2-normalized features (SGM);
- `ls`          the class's row of the ridge (least-squares) classifier on the features
                (Harun & Kanan, "A Good Start Matters").

When rows are written. The learner grows the head when a label first shows up, before any sample
of it is learned, so nothing is known about the class yet: every policy starts its row with the
same random draw. `class_mean` and `ls` then overwrite the row once, in the first learn step after
`min_samples` of the class have been observed: after that step's pre-update outcome is scored
(prequential numbers never see a label before scoring it) and before its gradient step (which
then trains from the new row).

`freeze_old` (every policy): at each task boundary every existing row is frozen; the `Strategy`
base writes frozen rows back after each optimizer step, so they stay bit-identical whatever the
optimizer's momentum or weight decay would have done.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from stream_cl.strategies.backbones import Classifier, ExpandingHead
from stream_cl.strategies.class_buffer import ClassBalancedBuffer
from stream_cl.strategies.options import DeferredOptions, HeadOptions, LSOptions, parse_text, parse_typed

__all__ = ["DeferredOptions", "HeadOptions", "LSOptions", "parse_text"]


@dataclass(frozen=True)
class HeadRows:
    """Rows to write into the head: `weight[i]` and `bias[i]` become class `classes[i]`'s row."""

    classes: tuple[int, ...]
    weight: torch.Tensor  # [k, feature_dim] float32
    bias: torch.Tensor  # [k] float32


def parse_options(policy: str, raw: Mapping[str, Any]) -> HeadOptions:
    """Typed options for `policy`; errors name `strategy.head` / `strategy.head_options.KEY`."""
    options = parse_typed(
        get_policy(policy).options_type, raw, "strategy.head_options", f"head policy {policy!r}"
    )
    options.validate()
    return options


# -- policies --------------------------------------------------------------------------------------
class HeadPolicy:
    """Base policy = `random`: keeps the rows `ExpandingHead.grow` draws; subclasses refine rows."""

    name: ClassVar[str] = "random"
    options_type: ClassVar[type[HeadOptions]] = HeadOptions

    def __init__(
        self, options: HeadOptions, loss: str, feature_dim: int, seed: int, device: torch.device
    ) -> None:
        self.options = options
        self.loss = loss
        self.feature_dim = feature_dim
        self.device = device

    @property
    def freeze_old(self) -> bool:
        return self.options.freeze_old

    def on_new_classes(self, classes: Sequence[int]) -> None:
        """`classes` were appended to the head with random rows."""

    def observe(
        self, model: Classifier, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor
    ) -> HeadRows | None:
        """One learn step's stream batch (inputs, detached features, labels); rows to write, if any."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        """Bounded buffers as {name: (items held, capacity)}."""
        return {}


class _DeferredHead(HeadPolicy, abc.ABC):
    """Counts samples per class and writes a class's row once `min_samples` of it were observed."""

    options: DeferredOptions

    def __init__(
        self, options: HeadOptions, loss: str, feature_dim: int, seed: int, device: torch.device
    ) -> None:
        super().__init__(options, loss, feature_dim, seed, device)
        self.counts = torch.zeros(0, dtype=torch.long, device=device)
        self.pending: list[int] = []

    def on_new_classes(self, classes: Sequence[int]) -> None:
        grow = max(classes) + 1 - self.counts.shape[0]
        if grow > 0:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
        self.pending.extend(classes)

    def observe(
        self, model: Classifier, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor
    ) -> HeadRows | None:
        self.counts += torch.bincount(y, minlength=self.counts.shape[0])
        self._accumulate(model, x, features, y)
        ready = [c for c in self.pending if int(self.counts[c]) >= self.options.min_samples]
        if not ready:
            return None
        self.pending = [c for c in self.pending if c not in ready]
        weight, bias = self._solve(model, ready)
        return HeadRows(tuple(ready), weight.float(), bias.float())

    @abc.abstractmethod
    def _accumulate(
        self, model: Classifier, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add the batch to the policy's statistics."""

    @abc.abstractmethod
    def _solve(self, model: Classifier, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [k, d] and biases [k] for `classes`."""

    def _reference_classes(self, head: ExpandingHead, exclude: Sequence[int]) -> list[int]:
        """Rows already in use: not among `exclude` and not waiting for their own solve."""
        skip = set(exclude) | set(self.pending)
        return [c for c in range(head.n_classes) if c not in skip]

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.cpu().clone(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = state["counts"].to(self.device)
        self.pending = list(state["pending"])


class ClassMeanHead(_DeferredHead):
    """Row = the mean direction of the class's normalized features.

    Cross-entropy: scaled to the old rows' mean norm, with their mean bias, so its logits compete
    on equal terms. MSE: scaled so the logit of a typical sample of the class is about 1.
    """

    name = "class_mean"
    options_type = DeferredOptions

    def __init__(
        self, options: HeadOptions, loss: str, feature_dim: int, seed: int, device: torch.device
    ) -> None:
        super().__init__(options, loss, feature_dim, seed, device)
        self.direction_sums = torch.zeros(0, feature_dim, dtype=torch.float64, device=device)
        self.norm_sums = torch.zeros(0, dtype=torch.float64, device=device)

    def on_new_classes(self, classes: Sequence[int]) -> None:
        super().on_new_classes(classes)
        grow = self.counts.shape[0] - self.norm_sums.shape[0]
        self.direction_sums = torch.cat(
            [self.direction_sums, self.direction_sums.new_zeros(grow, self.feature_dim)]
        )
        self.norm_sums = torch.cat([self.norm_sums, self.norm_sums.new_zeros(grow)])

    def _accumulate(
        self, model: Classifier, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor
    ) -> None:
        h = features.double()
        self.direction_sums.index_add_(0, y, F.normalize(h, dim=1))
        self.norm_sums.index_add_(0, y, h.norm(dim=1))

    def _solve(self, model: Classifier, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        direction = F.normalize(self.direction_sums[classes], dim=1)
        if self.loss == "mse":
            mean_norm = self.norm_sums[classes] / self.counts[classes]
            return direction / mean_norm.clamp_min(1e-12)[:, None], direction.new_zeros(len(classes))
        ref = self._reference_classes(model.head, classes)
        if not ref:
            return direction, direction.new_zeros(len(classes))
        with torch.no_grad():
            norm = model.head.weight[ref].norm(dim=1).mean().double()
            bias = model.head.bias[ref].mean().double()
        return direction * norm, bias.expand(len(classes))

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "direction_sums": self.direction_sums.cpu().clone(),
            "norm_sums": self.norm_sums.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.direction_sums = state["direction_sums"].to(self.device)
        self.norm_sums = state["norm_sums"].to(self.device)


class LSHead(_DeferredHead):
    """Row = the class's row of the ridge classifier on the features, solved once (Cholesky).

    Streaming statistics, per batch, on bias-augmented features a = [h, 1]: the second moment
    `S += Aᵀ A`, per-class sums `s_c += Σ_{y=c} a`, counts `n_c`, total `N`, and, while a class
    waits for its solve, its own second moment `S_c`. Without `balance`, a new class c gets
    `[w_c, b_c] = P_c (S/N + λI)⁻¹` with `P_c = s_c / N`: exactly the class's row of the ridge
    regression onto one-hot targets of every sample seen (its bias as the last feature; under
    mse the same on `h` alone, bias 0, see below). Only new rows are written; old ones are never
    touched.

    - few samples: λ regularizes; `min_samples` delays the solve;
    - class imbalance (`balance`, default): a new class has a handful of samples among thousands,
      so in the plain solve its direction is barely in `S` and its row overshoots wherever λ is
      all that holds it. The balanced solve weighs every class seen equally, in both terms:
      `G = (C-k)/C · G_old + 1/C · Σ_new S_c/n_c`, `P_c = (s_c/n_c) / C` (C classes seen, k new,
      `G_old` the old classes' second moment);
    - stale statistics (`refresh_buffer`): the backbone moves, so features summed long ago no
      longer match it; at each solve `S` (and `G_old`, the mean of the old classes' own second
      moments) is recomputed from a class-balanced reservoir of inputs through the current
      backbone (so with a refresh buffer `S` is not summed per batch: it would be overwritten
      unread). Class-balanced, because a uniform reservoir barely holds the class that arrived a
      few samples earlier (the other class of a task just begun), and the solve would ignore it:
      measured on split-mnist (mse, seed 0), the second class's new row gave a mean logit of 0.51
      on the first class's test samples with a uniform reservoir, 0.09 with this one. The new
      classes' own statistics are fresh: they just arrived;
    - cross-entropy (`calibrate`, `margin`, `max_norm`): a ridge row outputs about 1 on its
      class and 0 elsewhere, while CE-trained rows give logits of 10 or more. Scaling it to the
      old rows' norm is not enough: the ridge direction is mostly decorrelation, not the class
      mean, so at equal norm its logits are far below the old rows' on its own class, and the
      spike stays at 1x `random`. So the row is mapped onto the head's logits, measured on the
      refresh buffer (`_to_logits`): on its class it beats the strongest old row by `margin`.
    - mse: ridge rows are on the training loss's scale and are written as solved, without an
      intercept (the bias-free closed form). With one, every row also outputs
      about its class's share of the targets, 1/C, on inputs unlike any class it was solved on,
      so when the next task's classes arrive the earlier rows' outputs on them are larger; those
      outputs are about half of a new class's loss spike (`stream-cl bench heads` reports them
      as "old rows"). Without the intercept, ls against random over seeds 0-5 under `replay`:
      spike 0.73x -> 0.65x on split-mnist, 0.44x -> 0.40x on split-digits, final accuracy no
      lower. Under ce the intercept stays: the calibration reads the ridge outputs, and without
      it the spike on split-mnist went from 0.27x to 0.51x random's (seeds 0-2).
    """

    name = "ls"
    options_type = LSOptions
    options: LSOptions

    def __init__(
        self, options: HeadOptions, loss: str, feature_dim: int, seed: int, device: torch.device
    ) -> None:
        super().__init__(options, loss, feature_dim, seed, device)
        d = feature_dim + 1
        self.second_moment = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.class_sums = torch.zeros(0, d, dtype=torch.float64, device=device)
        self.pending_moments: dict[int, torch.Tensor] = {}  # S_c of classes waiting for their solve
        self.total = 0
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.buffer: ClassBalancedBuffer | None = None  # allocated at the first batch (input shape)

    def on_new_classes(self, classes: Sequence[int]) -> None:
        super().on_new_classes(classes)
        grow = self.counts.shape[0] - self.class_sums.shape[0]
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(grow, self.feature_dim + 1)])
        for c in classes:
            self.pending_moments[c] = torch.zeros_like(self.second_moment)

    def _accumulate(
        self, model: Classifier, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor
    ) -> None:
        a = _augment(features)
        if not self.options.refresh_buffer:  # else every solve rebuilds S from the buffer (`_refresh`)
            self.second_moment += a.T @ a
        self.class_sums.index_add_(0, y, a)
        self.total += int(y.shape[0])
        for c, moment in self.pending_moments.items():
            mine = a[y == c]
            moment += mine.T @ mine
        if self.options.refresh_buffer:
            if self.buffer is None:
                self.buffer = ClassBalancedBuffer(self.options.refresh_buffer, x.shape[1:], self.device)
            self.buffer.add(x, y, self.generator)

    def _solve(self, model: Classifier, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        old_moment: torch.Tensor | None = None  # mean second moment of the other classes' samples
        a = y = None  # the buffer's augmented features under the current backbone, and labels
        if self.buffer is not None and len(self.buffer):
            a, y = self._refresh(model, self.buffer)
            # The buffer holds every class about equally often; weigh each old class the same.
            per_class = [a[y == c] for c in torch.unique(y).tolist() if c not in classes]
            if per_class:
                old_moment = torch.stack([m.T @ m / m.shape[0] for m in per_class]).mean(0)
        new_moments = [self.pending_moments.pop(c) for c in classes]
        counts = self.counts[classes].double()
        if self.options.balance:
            seen = int((self.counts > 0).sum())
            if old_moment is None and self.total > int(counts.sum()):
                old_moment = (self.second_moment - sum(new_moments)) / (self.total - counts.sum())
            gram = sum(m / n for m, n in zip(new_moments, counts, strict=True)) / seen
            if old_moment is not None:
                gram = gram + old_moment * (seen - len(classes)) / seen
            targets = self.class_sums[classes] / counts[:, None] / seen
        else:
            gram = self.second_moment / self.total
            targets = self.class_sums[classes] / self.total
        size = self.feature_dim + 1 if self.loss == "ce" else self.feature_dim  # mse: no intercept
        gram = gram[:size, :size] + self.options.lam * torch.eye(size, dtype=gram.dtype, device=gram.device)
        rows = torch.cholesky_solve(targets[:, :size].T, torch.linalg.cholesky(gram)).T  # [k, size]
        if size == self.feature_dim:
            rows = torch.cat([rows, rows.new_zeros(len(classes), 1)], dim=1)  # bias 0
        ref = self._reference_classes(model.head, classes)
        if self.loss == "ce" and ref:
            rows = self._to_logits(model.head, rows, classes, ref, a, y)
        return rows[:, :-1], rows[:, -1]

    def _to_logits(
        self,
        head: ExpandingHead,
        rows: torch.Tensor,
        classes: list[int],
        ref: list[int],
        a: torch.Tensor | None,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cross-entropy: ridge rows [k, d + 1] brought to the scale of the head's rows `ref`.

        A ridge row outputs r ≈ 1 on its class and ≈ 0 elsewhere; a cross-entropy row must win
        the softmax on its class. With `calibrate`, each row is mapped affinely, `α r + β`, so
        that on the buffered samples of its class its mean logit is the strongest old row's mean
        logit there plus `margin`, and on the old classes' samples it sits at the old rows' mean
        logit on samples of other classes; α is capped so the row's norm stays within `max_norm`
        × the old rows' mean norm (an unbounded α follows a poor fit, r_c ≈ r_o, into logits
        that swamp the next class). Otherwise, and for a class without buffered samples, the row
        is scaled to the old rows' mean norm.
        """
        with torch.no_grad():
            old = torch.cat([head.weight[ref], head.bias[ref, None]], dim=1).double()  # [r, d + 1]
        old_norm = old[:, :-1].norm(dim=1).mean()
        norms = rows[:, :-1].norm(dim=1).clamp_min(1e-12)
        scaled = rows * (old_norm / norms)[:, None]
        if not self.options.calibrate or a is None or y is None:
            return scaled
        ref_t = torch.tensor(ref, device=y.device)
        of_old = torch.isin(y, ref_t)
        if not of_old.any():
            return scaled
        z = a @ old.T  # old rows' logits on the buffer [n, r]
        low = z[y[:, None] != ref_t[None, :]].mean()
        r = a @ rows.T  # ridge outputs [n, k]
        out = []
        for i, c in enumerate(classes):
            mine = y == c
            if not mine.any():
                out.append(scaled[i])
                continue
            high = z[mine].max(dim=1).values.mean() + self.options.margin
            r_c, r_o = r[mine, i].mean(), r[of_old, i].mean()
            alpha = ((high - low) / (r_c - r_o).clamp_min(1e-3)).clamp_min(0.0)
            alpha = torch.minimum(alpha, self.options.max_norm * old_norm / norms[i])
            row = rows[i] * alpha
            row[-1] += high - alpha * r_c
            out.append(row)
        return torch.stack(out)

    def _refresh(self, model: Classifier, buffer: ClassBalancedBuffer) -> tuple[torch.Tensor, torch.Tensor]:
        """`S` from the buffered inputs under the current backbone, rescaled to `total` samples.

        Returns the buffer's augmented features and labels.
        """
        was_training = model.training
        model.eval()
        with torch.no_grad():
            a = _augment(model.features(buffer.inputs()))
        model.train(was_training)
        self.second_moment = (a.T @ a) * (self.total / a.shape[0])
        return a, buffer.labels()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "second_moment": self.second_moment.cpu().clone(),
            "class_sums": self.class_sums.cpu().clone(),
            "pending_moments": {c: m.cpu().clone() for c, m in self.pending_moments.items()},
            "total": self.total,
            "generator": self.generator.get_state(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.second_moment = state["second_moment"].to(self.device)
        self.class_sums = state["class_sums"].to(self.device)
        self.pending_moments = {int(c): m.to(self.device) for c, m in state["pending_moments"].items()}
        self.total = int(state["total"])
        self.generator.set_state(state["generator"])
        self.buffer = None
        if state["buffer"] is not None:
            held = state["buffer"]["x"]
            self.buffer = ClassBalancedBuffer(self.options.refresh_buffer, held.shape[1:], self.device)
            self.buffer.load_state_dict(state["buffer"])

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        if not self.options.refresh_buffer:
            return {}
        return {
            "refresh_buffer": (0 if self.buffer is None else len(self.buffer), self.options.refresh_buffer)
        }


def _augment(features: torch.Tensor) -> torch.Tensor:
    h = features.detach().double()
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)


# -- frozen rows -----------------------------------------------------------------------------------
class FrozenRows:
    """Rows kept bit-identical: copied when frozen, written back after every optimizer step.

    Masking the update (rather than zeroing gradients) is what makes this exact: with Adam or
    momentum a zero gradient still moves a row whose moment estimates are non-zero.
    """

    def __init__(self) -> None:
        self.classes: list[int] = []
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def freeze(self, head: ExpandingHead, classes: Sequence[int]) -> None:
        new = [c for c in classes if c not in set(self.classes)]
        if not new:
            return
        with torch.no_grad():
            w, b = head.weight[new].detach().clone(), head.bias[new].detach().clone()
        self.classes += new
        self.weight = w if self.weight is None else torch.cat([self.weight, w])
        self.bias = b if self.bias is None else torch.cat([self.bias, b])

    def restore(self, head: ExpandingHead) -> None:
        if self.weight is None or self.bias is None:
            return
        with torch.no_grad():
            head.weight[self.classes] = self.weight
            head.bias[self.classes] = self.bias

    def state_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "weight": None if self.weight is None else self.weight.cpu().clone(),
            "bias": None if self.bias is None else self.bias.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.classes = list(state["classes"])
        self.weight = None if state["weight"] is None else state["weight"].to(device)
        self.bias = None if state["bias"] is None else state["bias"].to(device)


# -- registry --------------------------------------------------------------------------------------
HEAD_POLICIES: dict[str, type[HeadPolicy]] = {p.name: p for p in (HeadPolicy, ClassMeanHead, LSHead)}


def get_policy(name: str) -> type[HeadPolicy]:
    try:
        return HEAD_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"strategy.head: unknown head policy {name!r} (valid: {', '.join(HEAD_POLICIES)})"
        ) from None


def make_head_policy(
    name: str,
    options: Mapping[str, Any] | HeadOptions,
    *,
    loss: str,
    feature_dim: int,
    seed: int,
    device: torch.device,
) -> HeadPolicy:
    """Build a policy from its config name and raw (or already parsed) options; errors name the key."""
    if not isinstance(options, HeadOptions):
        options = parse_options(name, options)
    return get_policy(name)(options, loss, feature_dim, seed, device)
