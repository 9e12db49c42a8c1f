"""Task-boundary detection: decides when the stream has moved on to a new task.

Evidence, each switchable in `[boundaries]`:
- `explicit`: the sample's `task` field changed (trusted when configured);
- `new_class`: a label never seen before arrived, after the current task's minimum length
  (labels that appear within the first `min_task_length` samples of a task join that task).

The detector sees one labeled sample at a time, before it is learned, and returns a
`BoundaryEvent` when a new task starts at that sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from stream_cl.config import BoundariesConfig
from stream_cl.snapshot import TaskId


@dataclass(frozen=True)
class BoundaryEvent:
    reason: str  # "explicit" | "new_class" | "drift"
    previous_task: int | None  # task index before the boundary (None at the very first sample)
    task: int  # task index after it
    task_id: TaskId  # the task as clients name it (the stream's id, or the daemon's own number)
    recurring: bool = False
    partition: int | None = None
    offset: int | None = None
    sample_index: int = 0
    time: float = field(default_factory=time.time)
    evidence: dict[str, Any] = field(default_factory=dict)


class BoundaryDetector:
    """Explicit task ids and new-class evidence; owns the mapping task id ↔ task index."""

    def __init__(self, config: BoundariesConfig) -> None:
        self.config = config
        self.task_ids: list[TaskId] = []  # task index -> task id
        self.current: int | None = None
        self.samples_in_task = 0
        self.samples_seen = 0

    def observe(
        self,
        task_field: TaskId | None,
        new_label: bool,
        partition: int | None = None,
        offset: int | None = None,
    ) -> BoundaryEvent | None:
        """Look at one labeled sample before it is learned; return the boundary it opens, if any."""
        self.samples_seen += 1
        event: BoundaryEvent | None = None
        if self.config.explicit and task_field is not None:
            if self.current is None or self.task_ids[self.current] != task_field:
                event = self._open(task_field, "explicit", partition, offset, {"task_field": task_field})
        elif self.current is None:
            event = self._open(None, "new_class" if new_label else "explicit", partition, offset, {})
        elif self.config.new_class and new_label and self.samples_in_task >= self.config.min_task_length:
            event = self._open(
                None, "new_class", partition, offset, {"samples_in_task": self.samples_in_task}
            )
        self.samples_in_task += 1
        return event

    def _open(
        self, task_id: TaskId | None, reason: str, partition: int | None, offset: int | None, evidence: dict
    ) -> BoundaryEvent:
        recurring = task_id is not None and task_id in self.task_ids
        if task_id is not None and recurring:
            index = self.task_ids.index(task_id)
        else:
            index = len(self.task_ids)
            self.task_ids.append(task_id if task_id is not None else index)
        previous, self.current = self.current, index
        self.samples_in_task = 0
        return BoundaryEvent(
            reason=reason,
            previous_task=previous,
            task=index,
            task_id=self.task_ids[index],
            recurring=recurring,
            partition=partition,
            offset=offset,
            sample_index=self.samples_seen - 1,
            evidence=evidence,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "task_ids": list(self.task_ids),
            "current": self.current,
            "samples_in_task": self.samples_in_task,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_ids = list(state["task_ids"])
        self.current = state["current"]
        self.samples_in_task = state["samples_in_task"]
        self.samples_seen = state["samples_seen"]
