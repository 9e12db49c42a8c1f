"""Answering through one task: the hinted task, else the best joint (task, class) — vectorized.

Every task-partitioned protection (`eidetic`: one backbone with per-task head rows; `interval`: a
network per task) answers a request through one task's classes. With a task hint that task
answers. Without one, each known task's classes score
`log_softmax(task logits) + router_weight · router score(task, class)`, and the best pair's task
answers with the softmax of its classes' joint scores (`strategies/router.py` says why joint).

`TaskSlots` lays every known task's classes side by side in one row of *slots*, and pads them
into a grid [known tasks, most classes of one], so all tasks' logits and router scores are one
[n, tasks, most classes] tensor each and the joint choice (`answer_padded`) is a handful of tensor
operations whatever the number of tasks: no Python loop per task or per sample on the predict
path. A snapshot builds its `TaskSlots` once, and where it can its head rows and router weights
already in grid order (`TaskSlots.padded_rows`), so a request needs no gather.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Predict = tuple[torch.Tensor, list[int | None]]  # probabilities [n, classes], the task answering each


@dataclass(frozen=True)
class TaskSlots:
    """Where each known task's classes sit in a row of slots (tasks without classes are left out).

    `pad[i, j]` is the slot of known task i's j-th class, or `slots` (an extra −inf slot) past its
    last class; `pad_class[i, j]` the class id there, or `n_classes` (a column that is dropped).
    """

    known: list[int]  # tasks with classes, in task order
    classes: list[list[int]]  # per known task, its classes
    n_classes: int
    pad: torch.Tensor  # [known, most classes] long
    pad_class: torch.Tensor  # [known, most classes] long

    @classmethod
    def of(cls, task_classes: list[list[int]], n_classes: int, device: torch.device) -> TaskSlots:
        known = [t for t, c in enumerate(task_classes) if c]
        classes = [list(task_classes[t]) for t in known]
        slots = sum(len(c) for c in classes)
        width = max((len(c) for c in classes), default=0)
        pad = torch.full((len(known), width), slots, dtype=torch.long)
        pad_class = torch.full((len(known), width), n_classes, dtype=torch.long)
        start = 0
        for i, c in enumerate(classes):
            pad[i, : len(c)] = torch.arange(start, start + len(c))
            pad_class[i, : len(c)] = torch.tensor(c)
            start += len(c)
        return cls(known, classes, n_classes, pad.to(device), pad_class.to(device))

    @property
    def grid(self) -> tuple[int, int]:
        """(known tasks, most classes of one): the shape a sample's slots take when padded."""
        return (int(self.pad.shape[0]), int(self.pad.shape[1]))

    def pairs(self) -> list[tuple[int, int]]:
        """(task, class) of every slot, in slot order."""
        return [(t, c) for t, classes in zip(self.known, self.classes, strict=True) for c in classes]

    def padded(self, slot_values: torch.Tensor, fill: float) -> torch.Tensor:
        """`slot_values` [n, slots] as [n, known tasks, most classes], `fill` past a task's classes."""
        extra = slot_values.new_full((slot_values.shape[0], 1), fill)
        return torch.cat([slot_values, extra], dim=1)[:, self.pad]

    def padded_rows(self, rows: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-slot `rows` [slots, ...] (a head's weight rows, a bias) laid out as the padded grid
        [known tasks × most classes, ...], `fill` past a task's classes: a linear map with these rows
        answers in the padded layout directly."""
        extra = rows.new_full((1, *rows.shape[1:]), fill)
        return torch.cat([rows, extra])[self.pad.flatten()]


def answer_hinted(logits: torch.Tensor, classes: list[int], n_classes: int) -> torch.Tensor:
    """Probabilities over all classes from one task's logits over its classes (others get 0)."""
    out = logits.new_full((logits.shape[0], n_classes), float("-inf"))
    out[:, classes] = logits
    return torch.softmax(out, dim=1)


def answer_padded(logits: torch.Tensor, scores: torch.Tensor | None, layout: TaskSlots) -> Predict:
    """The joint choice on the padded grid: `logits` [n, known tasks, most classes] (−inf past a
    task's classes), `scores` the router's, already times `router_weight` (anything finite past a
    task's classes; None: the latest task answers). Per sample, the task of the best
    `log_softmax(task logits) + score` answers with the softmax of its classes' joint scores."""
    n = logits.shape[0]
    joint = logits.log_softmax(dim=2)
    if scores is None or len(layout.known) == 1:
        best = torch.full((n,), len(layout.known) - 1, dtype=torch.long, device=logits.device)
    else:
        joint = joint + scores
        best = joint.amax(dim=2).argmax(dim=1)
    chosen = joint[torch.arange(n, device=joint.device), best].softmax(dim=1)  # 0 past its classes
    out = chosen.new_zeros((n, layout.n_classes + 1))  # the padding lands in the extra column
    out.scatter_(1, layout.pad_class[best], chosen)
    return out[:, : layout.n_classes], [layout.known[i] for i in best.tolist()]


def answer_routed(
    slot_logits: torch.Tensor, router_slots: torch.Tensor | None, router_weight: float, layout: TaskSlots
) -> Predict:
    """`answer_padded` from per-slot logits and router scores [n, slots] (`router_slots` None, or a
    single known task: the latest task answers)."""
    scores = None if router_slots is None else router_weight * layout.padded(router_slots, 0.0)
    return answer_padded(layout.padded(slot_logits, float("-inf")), scores, layout)


TaskLogits = Callable[[int], torch.Tensor]  # task index -> logits [n, len(its classes)]


def predict_by_task(
    task_logits: TaskLogits,
    all_logits: Callable[[], torch.Tensor],
    n_classes: int,
    router: Callable[[torch.Tensor, TaskSlots], torch.Tensor] | None,
    router_weight: float,
    task_classes: list[list[int]],
    x: torch.Tensor,
    task: int | None,
) -> Predict:
    """Class probabilities through one task's answer, for a protection whose tasks answer apart.

    `task_logits(t)` is task t's own answer over its classes; `all_logits()` the fallback over
    every class (a hint for an unknown task, or nothing learned yet); `router(x, layout)` the
    router's scores per slot. Before the router was first solved requests without a hint go to
    the latest task.
    """
    n = x.shape[0]
    layout = TaskSlots.of(task_classes, n_classes, x.device)
    if task is None and not layout.known:
        return torch.softmax(all_logits(), dim=1), [None] * n
    if task is not None and task not in layout.known:
        live = all_logits()
        return (live if live.shape[1] == 0 else torch.softmax(live, dim=1)), [task] * n
    with torch.no_grad():
        if task is not None:
            return answer_hinted(task_logits(task), task_classes[task], n_classes), [task] * n
        if router is None or len(layout.known) == 1:
            return answer_routed(task_logits(layout.known[-1]), None, router_weight, _only_latest(layout))
        slot_logits = torch.cat([task_logits(t) for t in layout.known], dim=1)
        return answer_routed(slot_logits, router(x, layout), router_weight, layout)


def _only_latest(layout: TaskSlots) -> TaskSlots:
    """`layout` narrowed to its latest task (its logits alone were computed)."""
    task, classes = layout.known[-1], layout.classes[-1]
    narrowed: list[list[int]] = [[] for _ in range(task)] + [classes]
    return TaskSlots.of(narrowed, layout.n_classes, layout.pad.device)


def entropy_route(
    task_logits: TaskLogits, n_classes: int, task_classes: list[list[int]], x: torch.Tensor
) -> Predict:
    """Per sample, the answer of the task (softmax over its classes) with the least entropy."""
    known = [t for t, c in enumerate(task_classes) if c]
    n = x.shape[0]
    best_p = x.new_zeros((n, n_classes))
    best_h = torch.full((n,), float("inf"), device=x.device)
    routes = torch.full((n,), -1, dtype=torch.long)
    for t in known:
        proba = x.new_zeros((n, n_classes))
        with torch.no_grad():
            proba[:, task_classes[t]] = torch.softmax(task_logits(t), dim=1)
        h = -(proba * proba.clamp_min(1e-12).log()).sum(dim=1)
        better = h < best_h
        best_p = torch.where(better.unsqueeze(1), proba, best_p)
        best_h = torch.where(better, h, best_h)
        routes[better.cpu()] = t
    return best_p, [None if int(r) < 0 else int(r) for r in routes]
