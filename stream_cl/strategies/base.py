"""The `Strategy` base class: one learner, a few typed methods.

A strategy sees class *indices* (0, 1, ... in order of first appearance) and task *indices*; the
daemon owns the mapping from the stream's raw labels and task ids. Every strategy:

- `learn(batch)`            one online step; returns the pre-update (test-then-train) outcome;
- `add_classes(ids, task)`  grow the head for labels never seen before;
- `on_boundary(event)`      react to a task boundary (consolidate, snapshot old outputs, ...);
- `predict_proba(x, task)`  class probabilities, optionally restricted to a task's classes;
- `state_dict()` / `load_state_dict()`  everything needed to resume from a checkpoint.

Only `learn` is abstract; the rest has a sensible default here. A strategy is *backbone
protection × head policy* (docs/strategies.md): subclasses implement protection in `learn` using
`_forward` and `_step`, and the head policy (`strategy.head`, see `heads.py`) plugs in here,
so every protection composes with every head policy without knowing which one it got.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.config import ModelConfig
from stream_cl.strategies.backbones import Classifier, build_backbone, frozen_copy, resolve_device
from stream_cl.strategies.heads import FrozenRows, HeadRows, make_head_policy, parse_options
from stream_cl.strategies.options import HeadOptions, StrategyOptions, parse_typed

LOSSES = ("ce", "mse")


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # [n, *input_shape] float32, on the strategy's device
    y: torch.Tensor  # [n] int64 class indices, on the strategy's device
    task: int  # index of the task the batch belongs to


@dataclass(frozen=True)
class StepResult:
    """What the model did on the batch *before* the update (prequential, test-then-train)."""

    loss: float
    sample_losses: np.ndarray  # [n] float32, training loss (`strategy.loss`) per sample before the update
    correct: np.ndarray  # [n] bool, argmax prediction before the update was right


@dataclass(frozen=True)
class Boundary:
    """A task boundary as the strategy sees it (task indices, not raw ids)."""

    previous_task: int | None
    task: int
    reason: str  # "explicit" | "new_class" | "drift"
    recurring: bool = False


@dataclass(frozen=True)
class StrategyContext:
    """What every strategy is built from besides its own options, checked once: `from_config`
    builds it from `[model]` and `[strategy]`, and the `Strategy` base does the shared setup
    (backbone, head policy, optimizer, seeded generator) from it."""

    input_shape: tuple[int, ...]
    model: ModelConfig  # backbone, widths, optimizer, seed
    device: torch.device  # resolved (`auto` is CUDA when available)
    loss: str  # one of LOSSES
    head: str  # head policy name (`strategy.head`)
    head_options: HeadOptions  # parsed and validated `strategy.head_options`
    seed: int  # model initialization and strategy randomness (`model.seed`)

    @classmethod
    def create(
        cls,
        input_shape: Sequence[int],
        model: ModelConfig | None = None,
        head: str = "random",
        head_options: Mapping[str, Any] | HeadOptions | None = None,
        loss: str = "ce",
        device: str = "auto",
    ) -> StrategyContext:
        """Check and resolve everything once; ValueError("strategy.KEY: ...") names the key at fault."""
        model = model or ModelConfig()
        if loss not in LOSSES:
            raise ValueError(f"strategy.loss: expected one of {', '.join(LOSSES)}; got {loss!r}")
        if not isinstance(head_options, HeadOptions):
            head_options = parse_options(head, head_options or {})
        return cls(
            input_shape=tuple(int(d) for d in input_shape),
            model=model,
            device=resolve_device(device if device != "auto" else model.device),
            loss=loss,
            head=head,
            head_options=head_options,
            seed=model.seed,
        )


class Strategy(abc.ABC):
    """Base class; subclasses set `name` and `options_type` and implement `learn`.

    Built as `cls(context, options)`: the shared `StrategyContext` and the strategy's own options
    (`strategy.options`), an instance of `options_type`, whose fields document them. A bad value
    raises ValueError("strategy.options.KEY: ...") from `options_type.validate`, so the error
    names the key. `build` does both from plain arguments (tests, scripts).
    """

    name: ClassVar[str] = ""
    #: The strategy's options: a frozen dataclass with a default for every field.
    options_type: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: Reasons a conformance check does not apply, e.g. {"check_seeded_determinism": "why"}.
    check_opt_outs: ClassVar[dict[str, str]] = {}
    #: Options the conformance suite builds the strategy with, to keep its runs small (river's
    #: `_unit_test_params`), e.g. {"buffer_size": 16}.
    unit_test_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, context: StrategyContext, options: StrategyOptions | None = None) -> None:
        options = self.options_type() if options is None else options
        if not isinstance(options, self.options_type):
            raise TypeError(
                f"{type(self).__qualname__} takes {self.options_type.__qualname__}, "
                f"got {type(options).__qualname__}"
            )
        options.validate()
        self.options = options
        self.context = context
        self.input_shape = context.input_shape
        self.model_config = context.model
        self.loss = context.loss
        self.device = context.device
        seed = context.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(self.model_config.backbone, self.input_shape, self.model_config.hidden)
            self.model = Classifier(backbone, backbone.feature_dim).to(self.device)
        self.head_policy = make_head_policy(
            context.head,
            context.head_options,
            loss=self.loss,
            feature_dim=backbone.feature_dim,
            seed=seed,
            device=self.device,
        )
        self.frozen = FrozenRows()
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.task_classes: list[list[int]] = []  # task index -> class indices seen in that task
        self.current_task = 0
        self.optimizer = self._make_optimizer()

    @classmethod
    def parse_options(cls, raw: Mapping[str, Any]) -> StrategyOptions:
        """`strategy.options` as `options_type`, type-checked and validated; ValueError
        "strategy.options.KEY: ..." for an unknown key or a bad value."""
        options = parse_typed(cls.options_type, raw, "strategy.options", f"strategy {cls.name!r}")
        options.validate()
        return options

    @classmethod
    def build(
        cls,
        input_shape: Sequence[int],
        *,
        model: ModelConfig | None = None,
        head: str = "random",
        head_options: Mapping[str, Any] | None = None,
        loss: str = "ce",
        device: str = "auto",
        **options: Any,
    ) -> Self:
        """Context and options from plain arguments, checked like `from_config` checks config."""
        context = StrategyContext.create(
            input_shape, model=model, head=head, head_options=head_options, loss=loss, device=device
        )
        return cls(context, cls.parse_options(options))

    # -- optional capabilities (the learner and the benches ask every strategy) ----------------
    def free_capacity(self) -> float | None:
        """Fraction of the capacity for new tasks left (1 = all, 0 = exhausted); None when the
        strategy's capacity is not finite. Exported as `stream_cl_free_capacity_ratio`."""
        return None

    def capacity_exhausted(self) -> bool:
        """True once no capacity is left for new tasks (exported as `stream_cl_capacity_exhausted`)."""
        return False

    def protects_with_task_hint(self) -> bool:
        """True when a task's answers *with its task hint* never change once the task has ended
        (`eidetic`, `interval`): the conformance suite then holds the strategy to it
        (`checks.check_hinted_answers_do_not_change`)."""
        return False

    def weight_radius(self) -> float | None:
        """Mean half-width of interval weight boxes (`interval`); None for point-weight strategies."""
        return None

    def settle(self) -> bool:
        """Finish work queued off the learning thread (the stream went quiet), so that a predictor
        built next reflects everything learned; True when that predictor would answer differently
        from the last one built. Strategies without background work have nothing to do."""
        return False

    # -- the one abstract method ---------------------------------------------------------------
    @abc.abstractmethod
    def learn(self, batch: Batch) -> StepResult:
        """One online step on `batch`; returns the outcome measured before the update."""

    # -- classes, tasks, boundaries ------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return self.model.head.n_classes

    def add_classes(self, class_ids: Sequence[int], task: int) -> None:
        """Grow the head for new class indices (they must be the next indices in order)."""
        expected = list(range(self.n_classes, self.n_classes + len(class_ids)))
        if list(class_ids) != expected:
            raise ValueError(f"new classes must be the next indices {expected}, got {list(class_ids)}")
        self._ensure_task(task)
        carry = self._optimizer_state_by_name()
        self.model.head.grow(len(class_ids), self.generator)
        self.head_policy.on_new_classes(class_ids)
        self.task_classes[task].extend(class_ids)
        self._rebuild_optimizer(carry)

    def note_task(self, task: int, class_ids: Sequence[int]) -> None:
        """Record that classes already known also occur in `task` (domain/task-incremental)."""
        self._ensure_task(task)
        known = set(self.task_classes[task])
        self.task_classes[task].extend(c for c in class_ids if c not in known)

    def on_boundary(self, event: Boundary) -> None:
        """Track the current task; with `freeze_old`, every existing head row freezes here.

        Subclasses that extend this call `super().on_boundary(event)`.
        """
        self._ensure_task(event.task)
        self.current_task = event.task
        if self.head_policy.freeze_old:
            self.frozen.freeze(self.model.head, range(self.n_classes))

    def _ensure_task(self, task: int) -> None:
        while len(self.task_classes) <= task:
            self.task_classes.append([])

    # -- prediction ----------------------------------------------------------------------------
    def predict_proba(
        self, x: torch.Tensor, task: int | None = None
    ) -> tuple[torch.Tensor, list[int | None]]:
        """Probabilities over all classes [n, n_classes] and the task route taken per sample."""
        return self._predict_with(self.model, self.task_classes, x, task)

    @staticmethod
    def _predict_with(
        model: nn.Module, task_classes: list[list[int]], x: torch.Tensor, task: int | None
    ) -> tuple[torch.Tensor, list[int | None]]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(x)
        model.train(was_training)
        return Strategy._proba(logits, task_classes, task), [task] * x.shape[0]

    @staticmethod
    def _proba(logits: torch.Tensor, task_classes: list[list[int]], task: int | None) -> torch.Tensor:
        """Probabilities from the whole head's logits; with a task hint, over that task's classes."""
        if logits.shape[1] == 0:
            return logits.new_zeros((logits.shape[0], 0))
        if task is not None and task < len(task_classes) and task_classes[task]:
            mask = torch.full_like(logits, float("-inf"))
            mask[:, task_classes[task]] = 0.0
            logits = logits + mask
        return torch.softmax(logits, dim=1)

    def predictor(self) -> Any:
        """A frozen copy of what prediction needs, safe to call from other threads."""
        model = frozen_copy(self.model)  # eval mode, no grad; cheaper than deepcopy
        task_classes = [list(c) for c in self.task_classes]

        def predict(x: torch.Tensor, task: int | None) -> tuple[torch.Tensor, list[int | None]]:
            return Strategy._predict_with(model, task_classes, x, task)

        return predict

    # -- training helpers ----------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the trainable parameters, fused where torch can.

        Fused: one kernel per step instead of a dozen ops per parameter (the for-loop update torch
        picks on CPU), and in the daemon each of those ops would also release and retake the GIL.
        Same update rule; where torch has no fused kernel for the device (CPU before
        torch 2.4), its default implementation.
        """
        cfg = self.model_config
        params = [p for p in self.model.parameters() if p.requires_grad]

        def make(**fused: Any) -> torch.optim.Optimizer:
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(
                    params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused
                )
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)

        if not params:
            return make()
        try:
            return make(fused=True)
        # RuntimeError: "`fused=True` requires ... Tensors of supported devices"; TypeError: a
        # torch whose SGD takes no `fused` yet
        except (RuntimeError, TypeError):
            return make()

    def _optimizer_state_by_name(self) -> dict[str, dict[str, Any]]:
        return {
            name: self.optimizer.state[p]
            for name, p in self.model.named_parameters()
            if p in self.optimizer.state
        }

    def _rebuild_optimizer(self, carry: dict[str, dict[str, Any]] | None = None) -> None:
        """A new optimizer over the current parameters, with `carry` (state by parameter name) moved over.

        State of a parameter that grew (the head) is zero-padded for its new rows.
        """
        self.optimizer = self._make_optimizer()
        for name, p in self.model.named_parameters():
            state = (carry or {}).get(name)
            if not state or not p.requires_grad:
                continue
            moved: dict[str, Any] = {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    padded = torch.zeros_like(p)
                    padded[: value.shape[0]] = value
                    value = padded
                moved[key] = value
            self.optimizer.state[p] = moved

    def _forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        observed: int | None = None,
        train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, StepResult]:
        """Per-sample training losses on (x, y) and the pre-update outcome of the stream batch.

        The stream batch is the first `observed` samples (all by default; the rest are e.g.
        replayed). Features are computed once: the outcome is scored, then the head policy sees
        the stream part's features and may write rows for new classes; if it does, the returned
        losses are recomputed with those rows, so the coming gradient step trains from them.
        `train_loss(logits, y)` (default `_loss`) gives the training losses returned; the outcome
        always scores `_loss`.
        """
        n = y.shape[0] if observed is None else observed
        features = self.model.features(x)
        logits = self.model.head(features)
        losses = self._loss(logits, y)
        outcome = self._outcome(logits[:n], losses[:n], y[:n])
        rows = self.head_policy.observe(self.model, x[:n], features[:n].detach(), y[:n])
        if rows is not None and self._write_rows(rows):
            logits = self.model.head(features)
            losses = self._loss(logits, y) if train_loss is None else train_loss(logits, y)
        elif train_loss is not None:
            losses = train_loss(logits, y)
        return losses, outcome

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss: cross-entropy, or squared error against one-hot targets (`mse`)."""
        if self.loss == "mse":
            target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
            return ((logits - target) ** 2).sum(dim=1)
        return F.cross_entropy(logits, y, reduction="none")

    def _write_rows(self, rows: HeadRows) -> bool:
        """Write the policy's rows (frozen ones excepted) and zero their optimizer moments."""
        keep = [i for i, c in enumerate(rows.classes) if c not in set(self.frozen.classes)]
        if not keep:
            return False
        classes = [rows.classes[i] for i in keep]
        head = self.model.head
        with torch.no_grad():
            head.weight[classes] = rows.weight[keep].to(head.weight.device)
            head.bias[classes] = rows.bias[keep].to(head.bias.device)
            for p in (head.weight, head.bias):
                for value in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value[classes] = 0
        return True

    @staticmethod
    def _outcome(logits: torch.Tensor, losses: torch.Tensor, y: torch.Tensor) -> StepResult:
        with torch.no_grad():
            correct = (logits.argmax(1) == y).cpu().numpy()
            per_sample = losses.detach().float().cpu().numpy()
        return StepResult(loss=float(per_sample.mean()), sample_losses=per_sample, correct=correct)

    def _step(self, loss: torch.Tensor) -> None:
        """One optimizer step; frozen head rows are written back afterwards (exact freezing)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._before_update()
        self.optimizer.step()
        self.frozen.restore(self.model.head)
        self._after_update()

    def _before_update(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """Between backward and the optimizer step: a strategy may edit gradients here."""

    def _after_update(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """After the optimizer step: a strategy may restore entries it holds fixed here."""

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: weights, head size, optimizer, tasks, RNG. Subclasses extend it."""
        return {
            "name": self.name,
            "head": self.head_policy.name,
            "n_classes": self.n_classes,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "task_classes": [list(c) for c in self.task_classes],
            "current_task": self.current_task,
            "generator": self.generator.get_state(),
            "head_policy": self.head_policy.state_dict(),
            "frozen": self.frozen.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint is for strategy {state.get('name')!r}, not {self.name!r}")
        if state.get("head") != self.head_policy.name:
            raise ValueError(
                f"checkpoint is for head policy {state.get('head')!r}, not {self.head_policy.name!r}"
            )
        grow = state["n_classes"] - self.n_classes
        if grow < 0:
            raise ValueError("cannot load a checkpoint with fewer classes into a grown model")
        if grow:
            self.model.head.grow(grow)
        self.model.load_state_dict(state["model"])
        self.task_classes = [list(c) for c in state["task_classes"]]
        self.current_task = state["current_task"]
        self.generator.set_state(state["generator"])
        self.head_policy.load_state_dict(state["head_policy"])
        self.frozen.load_state_dict(state["frozen"], self.device)
        self._rebuild_optimizer()
        fused = [group.get("fused") for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, flag in zip(self.optimizer.param_groups, fused, strict=True):
            group["fused"] = flag  # a checkpoint's own flag is where it was written, not here

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        """Bounded buffers as {name: (items held, capacity)}; checked by the conformance suite.

        Subclasses with buffers of their own add them to `super().memory_usage()`.
        """
        return {f"head.{k}": v for k, v in self.head_policy.memory_usage().items()}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()


def is_int(value: Any) -> bool:
    """An int that is not a bool (TOML and --set give real ints; True must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int_options(minimum: int, **options: Any) -> None:
    """Each option must be an integer >= `minimum`; the error names `strategy.options.KEY`."""
    bound = "> 0" if minimum == 1 else f">= {minimum}"
    for key, value in options.items():
        if not is_int(value) or value < minimum:
            raise ValueError(f"strategy.options.{key}: expected an integer {bound}, got {value!r}")


def check_number_options(minimum: float, strict: bool = False, **options: Any) -> None:
    """Each option must be a number >= `minimum` (> with `strict`); the error names the key."""
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    for key, value in options.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or value < minimum or (strict and value == minimum):
            raise ValueError(f"strategy.options.{key}: expected a number {bound}, got {value!r}")


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
