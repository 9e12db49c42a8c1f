"""Evaluation of per-key models (`models.per_key`): each model holds out and scores like the one
model of a daemon does, within bounded memory, on one evaluator thread shared by all of them.

Memory: each model's reservoirs hold `evaluation.keyed_reservoir_size` samples per task, and all
models together at most `evaluation.keyed_max_samples` (past that, no model holds out more).

Exported: the aggregate over every model that has been scored (the mean of the models' figures)
in the daemon's usual series (`stream_cl_average_accuracy`, `stream_cl_average_forgetting`,
`stream_cl_backward_transfer`, `stream_cl_stability_gap`), and per-model series
(`stream_cl_model_*{model}`, R in `stream_cl_model_accuracy_matrix`) for at most
`metrics.max_model_labels` models: the most recently scored ones. A model beyond that is in the
aggregate only; its own figures stay in its checkpoint (`stream-cl report` on its directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import Gauge

from stream_cl.config import EvaluationConfig
from stream_cl.evaluate.evaluator import MATRIX_TASKS, Evaluator, rest_until
from stream_cl.evaluate.holdout import HoldoutBudget
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.types import TaskId

# the per-model figure -> (the model's gauge name, what the aggregate exports it as)
SUMMARY = {
    "average_accuracy": "stream_cl_model_average_accuracy",
    "average_forgetting": "stream_cl_model_average_forgetting",
    "backward_transfer": "stream_cl_model_backward_transfer",
    "stability_gap": "stream_cl_model_stability_gap",
}


class KeyedEvaluation:
    """The evaluators of every per-key model of a daemon, their thread, and what they export."""

    def __init__(self, config: EvaluationConfig, metrics: Metrics, max_model_labels: int) -> None:
        self.config = dataclasses.replace(config, reservoir_size=config.keyed_reservoir_size)
        self.metrics = metrics
        self.max_model_labels = max_model_labels
        self.budget = HoldoutBudget(config.keyed_max_samples)
        self.log = get_logger("stream_cl.evaluate.models")
        r = metrics.registry
        self.gauges = {
            figure: Gauge(
                name, f"The model's {figure.replace('_', ' ')} (models.per_key).", ["model"], registry=r
            )
            for figure, name in SUMMARY.items()
        }
        self.matrix = Gauge(
            "stream_cl_model_accuracy_matrix",
            f"R[i][j] of one model (models.per_key; its most recent {MATRIX_TASKS} tasks).",
            ["model", "after_task", "task"],
            registry=r,
        )
        self.models_scored = Gauge(
            "stream_cl_models_evaluated",
            "Per-key models with held-out figures (in the aggregate).",
            registry=r,
        )
        self._evaluators: dict[str, Evaluator] = {}
        self._figures: dict[str, dict[str, Any]] = {}  # latest per model, for the aggregate
        self._labelled: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()  # model -> its matrix cells
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resume_at = 0.0

    # -- models (learner thread) ------------------------------------------------------------------
    def evaluator(
        self, key: str, holder: SnapshotHolder, task_id_of: Callable[[int], TaskId], seed: int
    ) -> Evaluator:
        """A new evaluator for `key`'s model; scored on this object's thread."""
        evaluator = Evaluator(
            self.config,
            holder,
            self.metrics,
            task_id_of,
            seed=seed,
            export=lambda ev: self._scored(key, ev),
            budget=self.budget,
        )
        self.track(key, evaluator)
        return evaluator

    def track(self, key: str, evaluator: Evaluator) -> None:
        """Score `evaluator` as `key`'s (a new model, or one parked and assigned back)."""
        with self._lock:
            old = self._evaluators.get(key)
            self._evaluators[key] = evaluator
        if old is not None and old is not evaluator:
            self.budget.give_back(old.held())
        if old is None:
            self.budget.take(evaluator.held())

    def remove(self, key: str) -> None:
        """`key`'s model left this daemon (a handover): its memory, series and share of the aggregate go."""
        with self._lock:
            evaluator = self._evaluators.pop(key, None)
            self._figures.pop(key, None)
            cells = self._labelled.pop(key, None)
        if evaluator is not None:
            self.budget.give_back(evaluator.held())
        if cells is not None:
            self._clear_series(key, cells)
        self._export_aggregate()

    # -- the thread --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="stream-cl-evaluator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        tick = min(1.0, self.config.every_s) if self.config.every_s > 0 else 1.0
        last_timer = time.monotonic()
        while not self._stop.wait(tick):
            if time.monotonic() < self._resume_at:
                continue  # resting for the CPU budget: requests wait
            timer = self.config.every_s > 0 and time.monotonic() - last_timer >= self.config.every_s
            if timer:
                last_timer = time.monotonic()
            with self._lock:
                evaluators = list(self._evaluators.values())
            start = time.thread_time()
            for evaluator in evaluators:
                if self._stop.is_set():
                    break
                if evaluator.wants_scoring() or timer:
                    try:
                        evaluator.run_once()
                    except Exception:  # evaluation must never take the daemon down
                        self.log.exception("evaluation_failed")
            self._charge(time.thread_time() - start)

    def _charge(self, cpu_s: float) -> None:
        self._resume_at = rest_until(self._resume_at, cpu_s, self.config.max_cpu_share)

    # -- export (evaluator thread) -------------------------------------------------------------------
    def _scored(self, key: str, evaluator: Evaluator) -> None:
        figures = evaluator.figures()
        rows = evaluator.matrix_rows()
        with self._lock:
            if key not in self._evaluators:
                return  # removed while it was scored
            self._figures[key] = figures
            evicted = self._admit(key)
        for old, old_cells in evicted:
            self._clear_series(old, old_cells)
        model = key
        for figure, gauge in self.gauges.items():
            gauge.labels(model=model).set(figures[figure])
        recent = sorted(rows)[-MATRIX_TASKS:]
        cells: list[tuple[str, str]] = []
        for i in recent:
            for j, acc in rows[i].items():
                if j in recent:
                    cell = (str(evaluator.task_id_of(i)), str(evaluator.task_id_of(j)))
                    self.matrix.labels(model=model, after_task=cell[0], task=cell[1]).set(acc)
                    cells.append(cell)
        with self._lock:
            if key in self._labelled:
                stale = set(self._labelled[key]) - set(cells)
                self._labelled[key] = cells
            else:
                stale = set()
        for after_task, task in stale:
            self.matrix.remove(model, after_task, task)
        self.metrics.evaluations.inc()
        self._export_aggregate()

    def _admit(self, key: str) -> list[tuple[str, list[tuple[str, str]]]]:
        """Give `key` series of its own, dropping the least recently scored models beyond the cap."""
        labelled = self._labelled
        if key in labelled:
            labelled.move_to_end(key)
        else:
            labelled[key] = []
        evicted = []
        while len(labelled) > self.max_model_labels:
            evicted.append(labelled.popitem(last=False))
        return evicted

    def _clear_series(self, key: str, cells: list[tuple[str, str]]) -> None:
        for gauge in self.gauges.values():
            with contextlib.suppress(KeyError):
                gauge.remove(key)
        for after_task, task in cells:
            with contextlib.suppress(KeyError):
                self.matrix.remove(key, after_task, task)

    def _export_aggregate(self) -> None:
        """The mean over the scored models of each figure, in the daemon's usual series."""
        with self._lock:
            scored = list(self._figures.values())
        m = self.metrics
        self.models_scored.set(len(scored))
        targets = {
            "average_accuracy": m.average_accuracy,
            "average_forgetting": m.average_forgetting,
            "backward_transfer": m.backward_transfer,
            "stability_gap": m.stability_gap,
        }
        for figure, gauge in targets.items():
            gauge.set(float(np.mean([f[figure] for f in scored])) if scored else float("nan"))
