"""Types every layer shares: what a label and a task id may be."""

from __future__ import annotations

Label = int | str  # a class label as it arrives on the stream (the sample's `y`)
TaskId = int | str  # a task id as it arrives on the stream (the sample's `task`), or a detected task's index
