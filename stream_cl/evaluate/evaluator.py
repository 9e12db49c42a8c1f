"""Live evaluation: held-out reservoirs per task and the accuracy matrix R[i][j].

Production has no test set, so the daemon makes its own: a fraction `evaluation.holdout_fraction`
of each task's labeled samples (of labels already known) is held out — never learned — and kept
in a bounded reservoir per task. An evaluator thread re-scores every task's reservoir on the
current snapshot every `every_samples` learned samples or `every_s` seconds, and at each boundary,
off the learning path.

R[i][j] is the accuracy on task j after training up to task i: row i is finalized with the
snapshot published at the boundary that ends task i; the row of the current task is the latest
evaluation. From it (definitions as exported):
- forgetting, max-based (Chaudhry):  max_{l<T} R[l][j] − R[T][j]
- forgetting, first-vs-last:         R[j][j] − R[T][j]
- BWT (Lopez-Paz):                   mean_{j<T} (R[T][j] − R[j][j])
- stability gap: the largest drop of an old task's accuracy, measured in the evaluations during
  the `stability_window` samples after a boundary, relative to its accuracy at the boundary.

Evaluation shares the cores (and the GIL) with learning, so it has a budget: `max_cpu_share` of
one core. Each CPU second the evaluator spends buys (1/share - 1) seconds in which no scoring
starts; every request for the latest snapshot that comes meanwhile is served by the one scoring
after. A boundary's row waits too, on its own boundary's snapshot, and is scored first when the
rest is over. R holds one row per task, so a row still waiting when the same task ends again (a
recurring task) is superseded by the later one: the matrix ends up as if every row had been
scored, and the waiting rows are bounded by the number of tasks. Beyond `MAX_WAITING_ROWS` (a
stream of new tasks faster than the budget allows), the oldest is scored at once, over budget.
`stop` scores whatever still waits. The budget only binds when the daemon is saturated (learning
as fast as it can); then fewer evaluations fall inside a stability window, and the gap is
measured from those.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stream_cl.config import EvaluationConfig
from stream_cl.evaluate.holdout import HoldoutBudget, Reservoir
from stream_cl.evaluate.scoring import label_targets, predicted_indices
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
from stream_cl.types import Label, TaskId

MATRIX_TASKS = 16  # tasks exported in stream_cl_accuracy_matrix (bounded label cardinality)
MAX_WAITING_ROWS = 8  # boundary rows (each holding its snapshot) that may wait for the CPU budget


# (holder, task_id_of, seed) -> an evaluator, for a learner whose evaluator someone else runs
EvaluatorFactory = Callable[[SnapshotHolder, Callable[[int], TaskId], int], "Evaluator"]


class Evaluator:
    """Owns the reservoirs and R; the learner feeds it, its own thread scores snapshots."""

    def __init__(
        self,
        config: EvaluationConfig,
        holder: SnapshotHolder,
        metrics: Metrics,
        task_id_of: Callable[[int], TaskId],
        seed: int = 0,
        export: Callable[[Evaluator], None] | None = None,
        budget: HoldoutBudget | None = None,
    ) -> None:
        """`export`: where each scoring's figures go (default: the daemon's gauges); `budget`:
        a bound on held-out samples shared with other evaluators (per-key models)."""
        self.config = config
        self.export = export if export is not None else _export_to_metrics
        self.budget = budget
        self.holder = holder
        self.metrics = metrics
        self.task_id_of = task_id_of
        self.log = get_logger("stream_cl.evaluate.evaluator")
        self.rng = random.Random(seed)
        self.reservoirs: dict[int, Reservoir] = {}
        self.final_rows: dict[int, dict[int, float]] = {}  # task i -> {task j: R[i][j]}
        self.current: dict[int, float] = {}  # latest accuracies on each task
        self.current_task: int | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=config.history)
        self.boundaries: deque[dict[str, Any]] = deque(maxlen=config.history)
        self.stability_gap = 0.0
        self._gap_window: tuple[int, dict[int, float]] | None = None  # (until sample count, R at boundary)
        self.learned = 0
        self._last_eval_samples = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending_boundaries: deque[tuple[int, Snapshot | None]] = deque()
        self._thread: threading.Thread | None = None
        self._resume_at = 0.0  # monotonic time before which the budget lets no scoring start
        self.evaluations = 0
        self.revision = 0  # bumped by every row finalized and every scoring: what a checkpoint holds
        # Scores by snapshot version, then (task, reservoir.seen, hint): a snapshot is immutable
        # and a reservoir changes only by `add` (which bumps `seen`), so a hit is exactly the score
        # a forward pass would give. Right after a boundary and while evaluating densely, the
        # same version is often scored twice.
        self._scores: dict[int, dict[tuple[int, int, TaskId | None], float]] = {}
        # What is scored, per task: (reservoir.seen, inputs, labels), taken (copy-on-write, see
        # `Reservoir`) only when the reservoir changed since, and the labels as indices into the
        # label map, per (seen, number of labels). An evaluation used to copy every reservoir and
        # compare labels in a Python loop: that held the GIL the learner waits on.
        self._held: dict[int, tuple[int, np.ndarray, list[Label]]] = {}
        self._targets: dict[int, tuple[int, int, np.ndarray]] = {}

    # -- learner side (learner thread) ----------------------------------------------------------
    def hold_out(self) -> bool:
        if self.budget is not None and not self.budget.has_room():
            return False
        return self.config.holdout_fraction > 0 and self.rng.random() < self.config.holdout_fraction

    def add(self, task: int, x: np.ndarray, y: Label) -> None:
        with self._lock:
            reservoir = self.reservoirs.setdefault(task, Reservoir(self.config.reservoir_size))
            before = len(reservoir.ys)
            reservoir.add(x, y, self.rng)
            grew = len(reservoir.ys) - before
        if grew and self.budget is not None:
            self.budget.take(grew)

    def held(self) -> int:
        """Held-out samples in the reservoirs."""
        with self._lock:
            return sum(len(r.ys) for r in self.reservoirs.values())

    def wants_scoring(self) -> bool:
        """Whether a scoring was asked for since the last call (for a thread shared by evaluators)."""
        wanted = self._wake.is_set()
        self._wake.clear()
        return wanted

    def on_learned(self, learned: int) -> None:
        self.learned = learned
        every = self.config.every_samples
        if self._gap_window is not None or self._pending_boundaries:
            # just after a boundary: evaluate densely, or the stability gap is never observed
            every = max(1, self.config.stability_window // 5)
        if every and learned - self._last_eval_samples >= every:
            self._last_eval_samples = learned
            self._wake.set()

    def on_boundary(
        self, previous_task: int | None, task: int, snapshot: Snapshot | None, reason: str
    ) -> None:
        """Task `previous_task` ended with `snapshot`: finalize its row of R (in the evaluator thread)."""
        with self._lock:
            self.boundaries.append(
                {"t": time.time(), "samples": self.learned, "task": self.task_id_of(task), "reason": reason}
            )
            if previous_task is not None:
                pending = self._pending_boundaries
                for i, (ended, _) in enumerate(pending):
                    if ended == previous_task:  # not scored yet: this later end supersedes it
                        del pending[i]
                        break
                pending.append((previous_task, snapshot))
            self.current_task = task
        self._wake.set()

    # -- scoring --------------------------------------------------------------------------------
    def evaluate(self, snapshot: Snapshot | None = None) -> dict[int, float]:
        """Score every reservoir on `snapshot` (default: the latest) and refresh the metrics."""
        snapshot = snapshot or self.holder.get()
        if snapshot is None:
            return {}
        with self._lock:
            for t, r in self.reservoirs.items():
                if r.ys and self._held.get(t, (None,))[0] != r.seen:
                    self._held[t] = (r.seen, *r.share())
            data = dict(self._held)
        known = self._scores.setdefault(snapshot.version, {})
        while len(self._scores) > 4:  # the boundary's snapshot and the latest few
            del self._scores[min(self._scores)]
        scores: dict[int, float] = {}
        todo: dict[TaskId | None, list[int]] = {}  # tasks to score, by the task hint they get
        for task, (seen, _, _) in data.items():
            hint = (
                self.task_id_of(task)
                if self.config.task_hint and self.task_id_of(task) in snapshot.tasks
                else None
            )
            if (task, seen, hint) in known:
                scores[task] = known[(task, seen, hint)]
            else:
                todo.setdefault(hint, []).append(task)
        for hint, tasks in todo.items():
            if not snapshot.labels:  # nothing to predict yet: every sample counts as wrong
                for task in tasks:
                    scores[task] = known[(task, data[task][0], hint)] = 0.0
                continue
            # one forward pass for every task with the same hint: each pass's Python overhead
            # takes the GIL back from the learner, so fewer, larger passes
            xs = np.concatenate([data[t][1] for t in tasks]) if len(tasks) > 1 else data[tasks[0]][1]
            predicted = predicted_indices(snapshot, xs, hint)
            start = 0
            for task in tasks:
                seen, _, ys = data[task]
                hits = predicted[start : start + len(ys)] == self._targets_of(task, seen, ys, snapshot)
                start += len(ys)
                scores[task] = known[(task, seen, hint)] = float(hits.mean())
        return scores

    def _targets_of(self, task: int, seen: int, ys: list[Label], snapshot: Snapshot) -> np.ndarray:
        """`label_targets` of a reservoir as held at `seen`: the label map only grows, by appending."""
        cached = self._targets.get(task)
        if cached is not None and cached[:2] == (seen, len(snapshot.labels)):
            return cached[2]
        targets = label_targets(snapshot.labels, ys)
        self._targets[task] = (seen, len(snapshot.labels), targets)
        return targets

    def run_once(self) -> None:
        """Finalize rows for boundaries that happened, then score the latest snapshot."""
        self.finalize_boundaries()
        self.score_latest()

    def finalize_boundaries(self, keep: int = 0) -> None:
        """Score each boundary's snapshot for its row of R, in order, until `keep` rows wait."""
        while True:
            with self._lock:
                if len(self._pending_boundaries) <= keep:
                    break
                ended, snap = self._pending_boundaries.popleft()
            row = self.evaluate(snap)
            with self._lock:
                self.revision += 1
                self.final_rows[ended] = row
                self._gap_window = (self.learned + self.config.stability_window, dict(row))
                self.stability_gap = 0.0  # a new boundary: its own gap is measured from here

    def score_latest(self) -> None:
        """Score the latest snapshot: the current row of R, the history, the stability gap."""
        scores = self.evaluate()
        if not scores:
            return
        with self._lock:
            self.current.update(scores)
            self.evaluations += 1
            self.revision += 1
            self.history.append(
                {
                    "t": time.time(),
                    "samples": self.learned,
                    "accuracy": {str(self.task_id_of(t)): a for t, a in scores.items()},
                }
            )
            if self._gap_window is not None:
                until, at_boundary = self._gap_window
                drops = [
                    at_boundary[j] - scores[j] for j in at_boundary if j in scores and j != self.current_task
                ]
                if drops:
                    self.stability_gap = max(self.stability_gap, max(drops))
                if self.learned > until:  # the window closed: the gap holds until the next boundary
                    self._gap_window = None
        self.export(self)

    # -- derived figures ------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """Per-task accuracy and forgetting, averages and BWT from R (see the module docstring)."""
        with self._lock:
            current, rows, now = dict(self.current), dict(self.final_rows), self.current_task
        forgetting: dict[int, float] = {}
        first_last: dict[int, float] = {}
        bwt_terms: list[float] = []
        for j, acc_now in current.items():
            if j == now:
                continue
            earlier = [row[j] for i, row in rows.items() if j in row and i != now]
            if earlier:
                forgetting[j] = max(earlier) - acc_now
            if j in rows and j in rows[j]:
                first_last[j] = rows[j][j] - acc_now
                bwt_terms.append(acc_now - rows[j][j])
        return {
            "accuracy": current,
            "forgetting": forgetting,
            "forgetting_first_last": first_last,
            "average_accuracy": float(np.mean(list(current.values()))) if current else 0.0,
            "average_forgetting": float(np.mean(list(forgetting.values()))) if forgetting else 0.0,
            "backward_transfer": float(np.mean(bwt_terms)) if bwt_terms else 0.0,
            "stability_gap": self.stability_gap,
        }

    def matrix_rows(self) -> dict[int, dict[int, float]]:
        """R's rows: the finalized ones and the current task's latest."""
        with self._lock:
            rows = {**self.final_rows}
            if self.current_task is not None:
                rows[self.current_task] = dict(self.current)
        return rows

    def _export(self) -> None:
        f = self.figures()
        m = self.metrics
        for task, acc in f["accuracy"].items():
            label = m.task_label(self.task_id_of(task))
            m.task_accuracy.labels(task=label).set(acc)
            if task in f["forgetting"]:
                m.task_forgetting.labels(task=label).set(f["forgetting"][task])
            if task in f["forgetting_first_last"]:
                m.task_forgetting_first_last.labels(task=label).set(f["forgetting_first_last"][task])
        m.average_accuracy.set(f["average_accuracy"])
        m.average_forgetting.set(f["average_forgetting"])
        m.backward_transfer.set(f["backward_transfer"])
        m.stability_gap.set(f["stability_gap"])
        m.evaluations.inc()
        rows = self.matrix_rows()
        recent = sorted(rows)[-MATRIX_TASKS:]
        m.accuracy_matrix.clear()
        for i in recent:
            for j, acc in rows[i].items():
                if j in recent:
                    m.accuracy_matrix.labels(
                        after_task=str(self.task_id_of(i)), task=str(self.task_id_of(j))
                    ).set(acc)

    def summary(self) -> dict[str, Any]:
        """R, the accuracy history and the boundaries, JSON-able (for reports)."""
        figures = {
            k: v for k, v in self.figures().items() if not isinstance(v, dict)
        }  # takes the lock itself
        with self._lock:
            tasks = sorted(set(self.reservoirs) | set(self.final_rows) | set(self.current))
            rows = {**self.final_rows}
            if self.current_task is not None:
                rows[self.current_task] = dict(self.current)
            return {
                "tasks": [self.task_id_of(t) for t in tasks],
                "matrix": [[rows.get(i, {}).get(j) for j in tasks] for i in tasks],
                "history": list(self.history),
                "boundaries": list(self.boundaries),
                "figures": figures,
            }

    # -- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="stream-cl-evaluator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still scoring: the rows it has not reached are left out
        self.finalize_boundaries()  # rows still waiting for the budget

    def _loop(self) -> None:
        due = False  # a scoring of the latest snapshot was asked for and has not run yet
        while not self._stop.is_set():
            now = time.monotonic()
            if due:
                timeout: float | None = max(0.0, self._resume_at - now)
            else:
                timeout = self.config.every_s if self.config.every_s > 0 else None
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            due = True  # woken by a request, or the `every_s` timer, or the budget's rest is over
            start = time.thread_time()
            try:
                if time.monotonic() >= self._resume_at:
                    self.finalize_boundaries()
                    due = False
                    self.score_latest()
                else:  # resting: rows wait (and `due` stays set) unless too many do
                    self.finalize_boundaries(keep=MAX_WAITING_ROWS)
            except Exception:  # evaluation must never take the daemon down
                due = False
                self.log.exception("evaluation_failed")
            self._charge(time.thread_time() - start)

    def _charge(self, cpu_s: float) -> None:
        self._resume_at = rest_until(self._resume_at, cpu_s, self.config.max_cpu_share)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "reservoirs": {
                    t: {
                        "x": torch.from_numpy(r.xs.copy()) if r.ys else torch.empty(0),
                        "y": list(r.ys),
                        "seen": r.seen,
                    }
                    for t, r in self.reservoirs.items()
                },
                "final_rows": {i: dict(row) for i, row in self.final_rows.items()},
                "current": dict(self.current),
                "current_task": self.current_task,
                "history": list(self.history),
                "boundaries": list(self.boundaries),
                "stability_gap": self.stability_gap,
                "rng": _rng_state(self.rng),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        before = self.held()
        self._load_state(state)
        if self.budget is not None:  # restored reservoirs count against the shared budget
            self.budget.give_back(before)
            self.budget.take(self.held())

    def _load_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._scores.clear()
            self._held.clear()
            self._targets.clear()
            self.reservoirs = {}
            for t, r in state["reservoirs"].items():
                res = Reservoir(self.config.reservoir_size, seen=int(r["seen"]))
                res.load(r["x"].numpy(), list(r["y"]))
                self.reservoirs[int(t)] = res
            self.final_rows = {
                int(i): {int(j): float(a) for j, a in row.items()} for i, row in state["final_rows"].items()
            }
            self.current = {int(j): float(a) for j, a in state["current"].items()}
            self.current_task = state["current_task"]
            self.history.extend(state["history"])
            self.boundaries.extend(state["boundaries"])
            self.stability_gap = float(state["stability_gap"])
            rng = state["rng"]
            self.rng.setstate((rng["version"], tuple(rng["internal"]), rng["gauss_next"]))

    def memory_usage(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {f"reservoir[{t}]": (len(r.ys), r.capacity) for t, r in self.reservoirs.items()}


def rest_until(resume_at: float, cpu_s: float, share: float) -> float:
    """When scoring may start again after `cpu_s` of CPU, so that an evaluator thread's share of one
    core stays within `share` (`evaluation.max_cpu_share`; 0 or 1 = no limit): each CPU second
    buys (1/share - 1) seconds of rest."""
    if 0 < share < 1 and cpu_s > 0:
        return max(resume_at, time.monotonic()) + cpu_s * (1 / share - 1)
    return resume_at


def _export_to_metrics(evaluator: Evaluator) -> None:
    """The one model's figures to the daemon's gauges."""
    evaluator._export()


def _rng_state(rng: random.Random) -> dict[str, Any]:
    version, internal, gauss_next = rng.getstate()
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def summary_from_checkpoint_state(state: dict[str, Any]) -> dict[str, Any]:
    """The evaluator summary stored in a checkpoint (for `stream-cl report --checkpoint`)."""
    summary = state.get("evaluator_summary")
    if summary is None:
        raise ValueError(
            "this checkpoint holds no evaluation (it was written with evaluation.holdout_fraction = 0)"
        )
    return dict(summary)
