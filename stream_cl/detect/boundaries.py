"""Task-boundary detection: decides when the stream has moved on, and to which task.

Evidence, each switchable in `[boundaries]`:
- `explicit`: the sample's `task` field changed (trusted when configured; while samples carry a
  trusted field, it is the only evidence);
- `new_class`: a label never seen before arrived after the current task's minimum length (labels
  that appear within the first `min_task_length` samples of a task join that task); or, when the
  recurring rule looks at classes, a known label of an earlier task whose classes are disjoint
  from the current task's (a class-incremental stream went back: that task recurs);
- `drift`: a river detector (`drift_detector`, `drift_params`) fed each sample's pre-update loss or
  error (`drift_signal`) fired on a rise. The learner reports outcomes after each step, so a drift
  boundary applies from the next sample observed.

Guard rails for drift: after any boundary the detector restarts and is not fed the outcomes of
the first `drift_cooldown` samples learned (the loss right after a change is the same change,
still settling); a firing counts only once `drift_warmup` values were fed since the restart; no
boundary opens before the current task has `min_task_length` samples.

Call contract (what `Learner` does): `observe` for every labeled sample in stream order, learned
or held out; `observe_outcome` for every learning step, samples in the order observed. Outcomes
reported right after an `observe` that opened a boundary, before the next `observe`, are the old
task's last batch: they are not fed to the new task's detector.

Recurring tasks: a drift boundary is matched against earlier tasks (`recurring`):
- `classes`: the recent labels outside the current task's classes all belong to an earlier
  task's classes (the smallest such set wins). Says nothing when the classes did not change.
- `inputs`: the recent inputs' per-feature mean is within `recurring_threshold` of an earlier
  task's signature (the nearest wins); distance = RMS over features of the mean difference in
  units of that task's per-feature standard deviation.
- `both`: an earlier task must pass the class test (no foreign label counts as a pass, so
  domain-incremental streams rely on inputs alone) and then the input test.
"Recent" is the last `recurring_window` samples. New-class boundaries never recur (the label is
new); explicit ones recur when the stream sends an id seen before.

Gradual changes: the task just left keeps sending samples for a while after the boundary (its
share falling as the new task's rises). So that one change opens one boundary:
- a visit's classes leave out the labels of the task just left once the visit has a label of its
  own (where every label is shared, as in domain-incremental streams, it keeps them all);
- while labels that only the task just left has are among the recent labels since the boundary,
  drift opens nothing: the loss rising on the old task's last samples is the same change;
- a return to the task just left needs the new task to have settled first (the old task's share
  of the recent labels down to `SETTLED_SHARE`), and then that share back up to `RETURN_SHARE`, or
  its label after `QUIET_WINDOWS` windows without one (a sharp return: opened at once).

A task's input signature (per-feature mean and variance) sums every input it was seen with,
except while the stream names its tasks (a trusted `task` field): then its id finds it again and
drift, whose matches read signatures and the recent window, is off. Its signature is still kept,
for a stream that stops naming tasks later, but from every `EXPLICIT_INPUT_EVERY`-th input of each
visit only (the first included; the recent window likewise): summing every input would cost the
learner thread a share of its time on every sample for a signature nobody reads.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stream_cl.config import BoundariesConfig
from stream_cl.detect.drift import DriftMonitor, canonical_name, detector_params, resolve_signal
from stream_cl.detect.signatures import TaskSignature
from stream_cl.types import Label, TaskId

STATE_VERSION = 1
FOLD_EVERY = 256  # inputs buffered before they are folded into the current task's signature
EXPLICIT_INPUT_EVERY = 8  # while the stream names its tasks, the inputs kept: 1 in this many
# Shares of the recent labels that only the task just left has: a visit has settled once they fall
# to SETTLED_SHARE, and a return to that task needs them back at RETURN_SHARE. Apart, so that a
# window's noise around one half during a gradual change does not flip between the two tasks.
SETTLED_SHARE = 0.25
RETURN_SHARE = 0.75
# A label of the task just left after this many windows without one is a return at once: the gaps
# between the last samples of a gradual change stay shorter (one window let about one in ten through).
QUIET_WINDOWS = 2


@dataclass(frozen=True)
class BoundaryEvent:
    reason: str  # "explicit" | "new_class" | "drift"
    previous_task: int | None  # task index before the boundary (None at the very first sample)
    task: int  # task index after it
    task_id: TaskId  # the task as clients name it (the stream's id, or the daemon's own number)
    recurring: bool = False
    partition: int | None = None
    offset: int | None = None
    sample_index: int = 0  # first sample (labeled, in stream order) of the new task
    time: float = field(default_factory=time.time)
    evidence: dict[str, Any] = field(default_factory=dict)


def build_monitor(config: BoundariesConfig) -> DriftMonitor | None:
    """The configured drift monitor (None when drift evidence is off); ConfigError naming the key."""
    if not config.drift:
        return None
    name = canonical_name(config.drift_detector)
    signal = resolve_signal(name, config.drift_signal)
    return DriftMonitor(name, detector_params(name, config.drift_params), signal)


class BoundaryDetector:
    """Decides boundaries from explicit ids, new labels and drift; owns the task id ↔ index mapping.

    The learner calls `observe` for each labeled sample before it is learned and `observe_outcome`
    after each learning step with the batch's pre-update per-sample losses and correctness.
    """

    def __init__(self, config: BoundariesConfig) -> None:
        self.config = config
        self.monitor = build_monitor(config)
        self.use_inputs = config.recurring in ("inputs", "both")
        self.task_ids: list[TaskId] = []  # task index -> task id
        self.task_labels: list[set[Label]] = []  # task index -> its classes (see `_remember`)
        self.signatures: list[TaskSignature | None] = []  # task index -> input signature
        self.current: int | None = None
        self.previous: int | None = None  # the task the current visit took over from
        self.own_label_seen = False  # the current visit has sent a label the previous task lacks
        self.settled = True  # the old task's share of the recent labels fell (see the docstring)
        self.left_label_at: int | None = None  # samples_in_task at the last label only the task just left has
        self.classes_at_visit: frozenset[Label] = (
            frozenset()
        )  # the current task's classes when the visit began
        self.samples_in_task = 0  # labeled samples observed since the current task began
        self.samples_seen = 0  # labeled samples observed
        self.learned_in_task = 0  # outcomes reported for the current task (cool-down counts these)
        self.old_task_tail = False  # the next outcomes are the previous task's last batch
        self.recent_labels: deque[Label] = deque(maxlen=config.recurring_window)
        self.recent_x: deque[np.ndarray] = deque(maxlen=config.recurring_window)
        # The current task's inputs not yet in its signature: folded in (`_fold_inputs`) in one
        # vectorized call every FOLD_EVERY inputs and before anything reads a signature.
        self._unfolded: list[np.ndarray] = []
        self._scratch: np.ndarray | None = None  # float64 rows for folding, reused (not state)
        self.explicit_stream = False  # the last sample carried a trusted task field
        # a task's classes are the labels of its first this many samples of a visit (`_remember`)
        self._label_window = max(config.min_task_length, config.recurring_window)

    # -- evidence ---------------------------------------------------------------------------------
    def observe(
        self,
        task_field: TaskId | None,
        new_label: bool,
        partition: int | None = None,
        offset: int | None = None,
        *,
        label: Label | None = None,
        x: np.ndarray | None = None,
    ) -> BoundaryEvent | None:
        """Look at one labeled sample before it is learned; return the boundary it opens, if any.

        `label` feeds class-based recurring matching and `x` input signatures; both are optional.
        `x` is kept by reference for a while (not copied): the caller must not modify it later.
        """
        cfg = self.config
        index = self.samples_seen
        self.old_task_tail = False
        self.explicit_stream = cfg.explicit and task_field is not None
        event: BoundaryEvent | None = None
        if self.explicit_stream:
            if self.current is None or self.task_ids[self.current] != task_field:
                event = self._open(
                    index, "explicit", partition, offset, {"task_field": task_field}, task_field
                )
        elif self.current is None:
            event = self._open(index, "new_class" if new_label else "explicit", partition, offset, {})
        elif cfg.new_class and self.samples_in_task >= cfg.min_task_length:
            evidence = {"label": label, "samples_in_task": self.samples_in_task}
            if new_label:
                event = self._open(index, "new_class", partition, offset, evidence)
            elif (back := self._returning_to(label)) is not None and self._may_return_to(back, by_label=True):
                evidence["returning_to"] = self.task_ids[back]
                event = self._open(index, "new_class", partition, offset, evidence, matched=back)
        self.samples_seen += 1
        self.samples_in_task += 1
        self._remember(label, x, new_label)
        return event

    def observe_outcome(
        self,
        sample_losses: np.ndarray,
        correct: np.ndarray,
        partition: int | None = None,
        offset: int | None = None,
    ) -> BoundaryEvent | None:
        """Feed one learning step's pre-update outcomes (stream order) to the drift detector.

        Returns the drift boundary if the detector fired on a rise past the guard rails. It applies
        from the next sample observed (`sample_index`): the learner's steps hold every sample
        observed since the last one. `partition`/`offset` are the batch's last record's, recorded
        on the event.
        """
        monitor = self.monitor
        if self.old_task_tail:
            self.old_task_tail = False
            return None
        if monitor is None or self.explicit_stream or self.current is None:
            return None
        cfg = self.config
        for loss, ok in zip(sample_losses.tolist(), correct.tolist(), strict=True):
            self.learned_in_task += 1
            if self.learned_in_task <= cfg.drift_cooldown:
                continue  # the change that opened this task, still settling
            value = monitor.value(loss, ok)
            if not monitor.update(value):
                continue
            if monitor.fed <= cfg.drift_warmup or self.samples_in_task < cfg.min_task_length:
                continue  # fired too early to tell a new task from noise; river resets itself
            if self._previous_share() > 0:
                continue  # the task just left still sends samples: the change that opened this one
            evidence: dict[str, Any] = {
                "detector": monitor.name,
                "signal": monitor.signal,
                "value": round(value, 4),
                "learned_in_task": self.learned_in_task,
                "values_fed": monitor.fed,
            }
            matched, match = self._match()
            if matched is not None and not self._may_return_to(matched):
                continue  # the loss of the old task's last samples, forgotten: not a return to it
            if match:
                evidence["match"] = match
            return self._open(self.samples_seen, "drift", partition, offset, evidence, matched=matched)
        return None

    # -- tasks ------------------------------------------------------------------------------------
    def _open(
        self,
        start: int,
        reason: str,
        partition: int | None,
        offset: int | None,
        evidence: dict[str, Any],
        task_id: TaskId | None = None,
        matched: int | None = None,
    ) -> BoundaryEvent:
        """Make the task starting at sample `start` current: `task_id` (explicit), `matched` or a new one."""
        self._fold_inputs()  # the buffered inputs belong to the task that ends here
        if task_id is not None and task_id in self.task_ids:
            index, recurring = self.task_ids.index(task_id), True
        elif matched is not None:
            index, recurring = matched, True
        else:
            index, recurring = len(self.task_ids), False
            self.task_ids.append(task_id if task_id is not None else index)
            self.task_labels.append(set())
            self.signatures.append(None)
        previous, self.current = self.current, index
        self.previous = previous
        self.own_label_seen = False
        self.settled = False
        self.left_label_at = None
        self.classes_at_visit = frozenset(self.task_labels[index])
        self.samples_in_task = 0
        self.learned_in_task = 0
        self.old_task_tail = reason != "drift"  # opened in `observe`: the learner flushes the old batch
        if self.monitor is not None:
            self.monitor.reset()
        return BoundaryEvent(
            reason=reason,
            previous_task=previous,
            task=index,
            task_id=self.task_ids[index],
            recurring=recurring,
            partition=partition,
            offset=offset,
            sample_index=start,
            evidence=evidence,
        )

    def _remember(self, label: Label | None, x: np.ndarray | None, new_label: bool = False) -> None:
        """Keep the recent window and the current task's classes and input signature.

        A task's classes are the labels seen in the first max(min_task_length, recurring_window)
        samples of each visit: a label that turns up later is what a change looks like before a
        detector catches it, so it must not make the old task look like the new one. Its inputs:
        every one, or 1 in `EXPLICIT_INPUT_EVERY` while the stream names its tasks.
        """
        assert self.current is not None
        if label is not None:
            self.recent_labels.append(label)
            self._remember_label(label, new_label)
        if x is not None and self.use_inputs:
            if self.explicit_stream and (self.samples_in_task - 1) % EXPLICIT_INPUT_EVERY:
                return  # the stream names this task (see the module docstring)
            # a view: float64 only where it is summed (no per-sample copy); the method, not
            # np.ravel, whose dispatch is slower per call
            flat = x.ravel()
            self.recent_x.append(flat)
            self._unfolded.append(flat)
            if len(self._unfolded) >= FOLD_EVERY:
                self._fold_inputs()

    def _remember_label(self, label: Label, new_label: bool) -> None:
        """The visit's classes, and what tells a gradual change from a return (module docstring).

        A visit's own label is one the task just left lacks that is new, or was the visit's task's
        before this visit.
        """
        assert self.current is not None
        current = self.task_labels[self.current]
        left = self.task_labels[self.previous] if self.previous is not None else ()
        if self.own_label_seen and label in left and label not in current:
            self.left_label_at = self.samples_in_task
        if label not in left and (new_label or label in self.classes_at_visit):
            self.own_label_seen = True  # (a label merely missing from the old task's set is not one)
        if self.samples_in_task <= self._label_window and (label not in left or not self.own_label_seen):
            current.add(label)  # all of them while labels cannot tell the tasks apart (shared labels)
        if (
            not self.settled
            and self.samples_in_task >= self.config.recurring_window
            and not self._previous_share() > SETTLED_SHARE
        ):
            self.settled = True  # judged over a full window since the boundary

    def _fold_inputs(self) -> None:
        """Add the buffered inputs to the current task's signature: the same sums as one `add` each."""
        if not self._unfolded:
            return
        assert self.current is not None
        xs, self._unfolded = self._unfolded, []
        signature = self.signatures[self.current]
        if signature is None:
            signature = self.signatures[self.current] = TaskSignature(xs[0].size)
        if self._scratch is None:  # add_many checks its size (input sizes are fixed per model)
            self._scratch = np.empty((FOLD_EVERY + 1, xs[0].size))
        signature.add_many(xs, self._scratch)

    def _returning_to(self, label: Label | None) -> int | None:
        """The earlier task a known label outside the current task's classes says the stream is back in.

        Only a task whose classes are disjoint from the current task's counts (class-incremental
        streams): where tasks share labels (domain-incremental), a label seen late says nothing.
        Used when the recurring rule looks at classes; else drift evidence covers returns.
        """
        assert self.current is not None
        current = self.task_labels[self.current]
        if (
            self.config.recurring not in ("classes", "both")
            or label is None
            or not current
            or label in current
        ):
            return None  # (a task with no classes yet is not disjoint from anything: it is still forming)
        owners = [
            t
            for t, labels in enumerate(self.task_labels)
            if t != self.current and label in labels and not labels & current
        ]
        return min(owners, key=lambda t: (len(self.task_labels[t]), -t)) if owners else None

    def _previous_share(self) -> float:
        """The share of the recent labels since the boundary that only the task just left has
        (NaN where labels cannot tell the two apart: the visit has sent no label of its own, as
        where tasks share their labels, or no label is the old task's alone)."""
        if self.previous is None or self.current is None or not self.own_label_seen:
            return math.nan
        only_left = self.task_labels[self.previous] - self.task_labels[self.current]
        since = min(self.samples_in_task, len(self.recent_labels))
        if not only_left:
            return math.nan
        if since == 0:
            return 0.0
        recent = list(self.recent_labels)[-since:]
        return sum(label in only_left for label in recent) / since

    def _may_return_to(self, task: int, by_label: bool = False) -> bool:
        """Whether a return to `task` is one, not the last samples of a gradual change away from it.

        Only the task just left needs more: the current visit has settled, and the old task's labels
        hold most recent ones again, or (`by_label`: one of its labels just came) had gone quiet for
        `QUIET_WINDOWS` × max(recurring_window, min_task_length) samples before it, as at a sharp
        return.
        """
        share = self._previous_share()
        if task != self.previous or math.isnan(share):
            return True
        if not self.settled:
            return False
        since_left = self.samples_in_task - (self.left_label_at if self.left_label_at is not None else 0)
        quiet = since_left >= QUIET_WINDOWS * max(self.config.recurring_window, self.config.min_task_length)
        return share >= RETURN_SHARE or (by_label and quiet)

    def _match(self) -> tuple[int | None, dict[str, Any]]:
        """The earlier task the recent samples belong to, by the configured rule, and why."""
        rule = self.config.recurring
        assert self.current is not None
        if rule == "off":
            return None, {}
        self._fold_inputs()
        candidates = [t for t in range(len(self.task_ids)) if t != self.current]
        match: dict[str, Any] = {"rule": rule}
        if rule in ("classes", "both"):
            foreign = set(self.recent_labels) - self.task_labels[self.current]
            match["foreign_labels"] = sorted(foreign, key=str)
            if rule == "classes" and not foreign:
                return None, match
            candidates = [t for t in candidates if foreign <= self.task_labels[t]]
        if rule == "classes":
            if not candidates:
                return None, match
            return min(candidates, key=lambda t: (len(self.task_labels[t]), -t)), match
        if not self.recent_x:
            return None, match
        window = np.mean(np.stack(self.recent_x).astype(np.float64, copy=False), axis=0)
        distances = {
            t: sig.distance(window)
            for t in candidates
            if (sig := self.signatures[t]) is not None and sig.n >= self.config.recurring_window
        }
        if not distances:
            return None, match
        nearest = min(distances, key=distances.__getitem__)
        match["nearest_task"] = self.task_ids[nearest]
        match["distance"] = round(distances[nearest], 4)
        return (nearest if distances[nearest] <= self.config.recurring_threshold else None), match

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values only: the river detector as name + parameters + values to replay, no pickle."""
        self._fold_inputs()
        return {
            "version": STATE_VERSION,
            "task_ids": list(self.task_ids),
            "task_labels": [sorted(labels, key=str) for labels in self.task_labels],
            "signatures": [None if s is None else s.state_dict() for s in self.signatures],
            "current": self.current,
            "previous": self.previous,
            "own_label_seen": self.own_label_seen,
            "settled": self.settled,
            "left_label_at": self.left_label_at,
            "classes_at_visit": sorted(self.classes_at_visit, key=str),
            "samples_in_task": self.samples_in_task,
            "samples_seen": self.samples_seen,
            "learned_in_task": self.learned_in_task,
            "old_task_tail": self.old_task_tail,
            "recent_labels": list(self.recent_labels),
            "recent_x": torch.from_numpy(np.stack(self.recent_x)) if self.recent_x else torch.empty(0),
            "explicit_stream": self.explicit_stream,
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a detector saved with other parameters than configured restarts fresh."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"boundary detector state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        self.task_ids = list(state["task_ids"])
        self.task_labels = [set(labels) for labels in state["task_labels"]]
        self.signatures = [None if s is None else TaskSignature.from_state(s) for s in state["signatures"]]
        self._unfolded = []
        self.current = state["current"]
        # saved before gradual changes were told apart: as if the visit had long settled
        self.previous = state.get("previous")
        self.own_label_seen = state.get("own_label_seen", True)
        self.settled = state.get("settled", True)
        self.left_label_at = state.get("left_label_at")
        self.classes_at_visit = frozenset(state.get("classes_at_visit", ()))
        self.samples_in_task = state["samples_in_task"]
        self.samples_seen = state["samples_seen"]
        self.learned_in_task = state["learned_in_task"]
        self.old_task_tail = state["old_task_tail"]
        self.recent_labels.clear()
        self.recent_labels.extend(state["recent_labels"])
        self.recent_x.clear()
        self.recent_x.extend(np.asarray(x, dtype=np.float64) for x in state["recent_x"])
        self.explicit_stream = state["explicit_stream"]
        if self.monitor is not None:
            if state["monitor"] is None:
                self.monitor.reset()
            else:
                self.monitor.load_state_dict(state["monitor"])
