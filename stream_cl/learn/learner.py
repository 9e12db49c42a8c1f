"""The learner: the one thread that owns and writes the model.

It takes decoded records from the source, maps raw labels to class indices (growing the head for
new ones), asks the boundary detector whether a new task starts, learns in mini-batches
(test-then-train: each batch is scored before the update, which feeds prequential accuracy),
and publishes an immutable snapshot every N steps, every T ms and at each boundary.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np
import torch

from stream_cl.config import Config
from stream_cl.detect.boundaries import BoundaryDetector, BoundaryEvent
from stream_cl.evaluate.evaluator import Evaluator, EvaluatorFactory
from stream_cl.ingest.chunk import Chunk, Record
from stream_cl.ingest.codec import Sample
from stream_cl.learn.checkpointing import CheckpointScheduler
from stream_cl.learn.offsets import OffsetTracker
from stream_cl.learn.outputs import LearnerOutputs
from stream_cl.learn.trajectory import TrajectoryRecorder
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics
from stream_cl.serve.registry import DEFAULT_KEY
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder, build_snapshot
from stream_cl.store.checkpoints import CheckpointStore
from stream_cl.strategies import Batch, Boundary, Strategy, check_config, from_config
from stream_cl.types import Label, TaskId

TRAJECTORY_TASKS = 4  # tasks whose start/end weights checkpoints keep: the first + the last 3


class Learner:
    """Turns records into strategy steps; single-threaded by design (the only model writer)."""

    def __init__(
        self,
        config: Config,
        holder: SnapshotHolder,
        metrics: Metrics,
        outputs: LearnerOutputs | None = None,
        checkpoints: CheckpointStore | None = None,
        key: str = DEFAULT_KEY,
        make_evaluator: EvaluatorFactory | None = None,  # when someone else runs it (per-key models)
    ) -> None:
        self.config = config
        self.key = key  # the model key it learns (per-key models), for its outputs
        self.holder = holder
        self.metrics = metrics
        self.outputs = outputs if outputs is not None else LearnerOutputs()
        self.checkpoints = checkpoints
        self.offsets: dict[int, int] = {}  # partition -> next offset; every record before it is processed
        self._accepted = OffsetTracker()  # what was taken in (processed or pending): exactly once
        self.log = get_logger("stream_cl.learn.learner")
        check_config(config)  # fail on a bad [strategy] before consuming anything
        self.detector = BoundaryDetector(config.boundaries)
        self.evaluator: Evaluator | None = None
        if config.evaluation.holdout_fraction > 0:
            seed = config.model.seed
            if make_evaluator is None:
                self.evaluator = Evaluator(config.evaluation, holder, metrics, self._task_id_of, seed=seed)
            else:
                self.evaluator = make_evaluator(holder, self._task_id_of, seed)
        self.strategy: Strategy | None = None
        self.input_shape = None
        if config.model.input_dim:
            self.input_shape = (config.model.input_dim,)
        self.labels: list[Label] = []
        self.label_index: dict[Label, int] = {}
        self.version = 0
        self.steps = 0
        self.learned = 0
        self.held_out = 0
        self.boundaries: list[BoundaryEvent] = []
        self.trajectory = TrajectoryRecorder(TRAJECTORY_TASKS)
        self._prequential: deque[bool] = deque(maxlen=config.learner.prequential_window)
        self._pending: list[tuple[np.ndarray, int, int, int]] = []  # (x, class, partition, offset)
        self._pending_task = 0  # its task; at a boundary `detector.current` is already the next one
        # processed (partition, offset) waiting for the pending batch's step
        self._deferred: list[tuple[int, int]] = []
        self._steps_since_publish = 0
        self._last_publish = time.monotonic()
        self._settled = True  # the last snapshot waited for the strategy's background work
        self._lock = threading.Lock()  # guards stats read by other threads
        # Hot-path bookkeeping (it runs for every sample): Prometheus children resolved
        # once (`labels()` costs microseconds), held-out counts reported per step, and
        # `note_task` called once per (task, class) pair (it is idempotent).
        self._learned_counter = metrics.samples.labels(outcome="learned")
        self._held_out_counter = metrics.samples.labels(outcome="held_out")
        self._held_out_unreported = 0
        self._noted: set[tuple[int, int]] = set()
        # Scheduled checkpoints are written on a writer thread (checkpointing.py). Not for per-key
        # models: their handover bookkeeping takes `checkpointed` to mean "everything taken in so
        # far is saved", true only when the write happens before anything else.
        self._background_checkpoints = config.checkpoint.background and not config.models.per_key
        self.scheduler = (
            None
            if checkpoints is None
            else CheckpointScheduler(
                checkpoints,
                config.checkpoint,
                metrics,
                self.log,
                on_written=lambda offsets: self.outputs.checkpointed(offsets),
                background=self._background_checkpoints,
            )
        )

    # -- inputs ---------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    @input_shape.setter
    def input_shape(self, shape: tuple[int, ...] | None) -> None:
        # input_size is read for every sample: computed once here, not per read
        self._input_shape = shape
        self.input_size: int | None = int(np.prod(shape)) if shape else None

    def _ensure_strategy(self, x: np.ndarray, shape: Any) -> Strategy:
        if self.strategy is None:
            if self.input_shape is None:
                self.input_shape = tuple(shape) if shape else (x.size,)
            cfg = self.config
            self.strategy = from_config(cfg, self.input_shape)
            self.log.info(
                "model_created",
                strategy=cfg.strategy.name,
                input_shape=list(self.input_shape),
                device=str(self.strategy.device),
            )
        return self.strategy

    def process(self, chunk: Chunk | list[Record]) -> None:
        """Handle one polled chunk of records in stream order (a list of Records is made a Chunk)."""
        if not isinstance(chunk, Chunk):
            chunk = Chunk.of(chunk)
        take = self._accepted.take
        label_index = self.label_index
        detector = self.detector
        evaluator = self.evaluator
        batch_size = self.config.model.batch_size
        xs = chunk.xs
        for i, partition, offset, invalid, x0, x1, y, sample_task in zip(
            range(len(chunk)),
            chunk.partitions,
            chunk.offsets,
            chunk.invalid,
            chunk.x_starts,
            chunk.x_ends,
            chunk.ys,
            chunk.tasks,
            strict=True,
        ):
            if not take(partition, offset):
                continue  # already taken in (re-delivered after a rebalance or a restore): exactly once
            if invalid is not None:  # dead-lettered by the source
                self._done_without_learning(partition, offset)
                continue
            if self.input_size is not None and x1 - x0 != self.input_size:
                detail = f"'x' has {x1 - x0} features, expected {self.input_size}"
                self._reject(partition, offset, chunk.raw(i), "bad_length", detail)
                continue
            x = xs[x0:x1]
            strategy = (
                self.strategy if self.strategy is not None else self._ensure_strategy(x, chunk.shapes[i])
            )
            if y is None:
                self._unlabeled(partition, offset, chunk.sample(i))
                continue
            cls = label_index.get(y)
            if cls is None and len(self.labels) >= self.config.model.max_classes:
                detail = f"label {y!r} beyond model.max_classes"
                self._reject(partition, offset, chunk.raw(i), "too_many_classes", detail)
                continue
            event = detector.observe(sample_task, cls is None, partition, offset, label=y, x=x)
            if event is not None:
                self._learn_pending()
                self._boundary(event)
            task = detector.current or 0
            if cls is None:
                # The head grows before any sample of the class is learned, and the class joins the
                # batch being filled. Cutting the batch here gave the first class of a task a step
                # of its own, with the 1-3 samples before the next new label, and a head policy
                # solved its row from those.
                cls = len(self.labels)
                self.labels.append(y)
                label_index[y] = cls
                strategy.add_classes([cls], task)
                self._noted.add((task, cls))
                self.metrics.classes_seen.set(len(self.labels))
            elif evaluator is not None and evaluator.hold_out():
                evaluator.add(task, x, y)
                self._held_out_unreported += 1
                self.held_out += 1
                self._done_without_learning(partition, offset)
                continue
            elif (task, cls) not in self._noted:
                strategy.note_task(task, [cls])
                self._noted.add((task, cls))
            self._pending.append((x, cls, partition, offset))
            self._pending_task = task
            if len(self._pending) >= batch_size:
                self._learn_pending()
        self._report_held_out()
        self._maybe_publish()
        self._checkpoint_if_due()

    def _task_id_of(self, index: int) -> TaskId:
        return self.detector.task_ids[index]

    def start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.start()

    def close(self, final: bool = True) -> None:
        if final:
            self.flush()
        if self.evaluator is not None:
            self.evaluator.stop()  # scores the rows still waiting: the last checkpoint holds them
        if final and self.strategy is not None:
            self.checkpoint()

    def _report_held_out(self) -> None:
        if self._held_out_unreported:
            self._held_out_counter.inc(self._held_out_unreported)
            self._held_out_unreported = 0

    def flush(self) -> None:
        """Learn a partial batch (the stream went quiet), publish, and write a checkpoint that is due
        (one deferred by `checkpoint.min_interval_s` must not wait: the stream may stay quiet)."""
        self._learn_pending()
        self._report_held_out()
        # The quiet time finishes the strategy's background work; what it changes is published.
        changed = not self._settled and self.strategy is not None and self.strategy.settle()
        self._settled = True
        self._maybe_publish(force=self._steps_since_publish > 0 or changed)
        self._checkpoint_if_due()

    # -- learning -------------------------------------------------------------------------------
    def _learn_pending(self) -> None:
        if not self._pending or self.strategy is None:
            return
        pending, self._pending = self._pending, []
        strategy = self.strategy
        # one concatenate, then the reshape below: cheaper than np.stack's per-row expand_dims
        x = torch.from_numpy(np.concatenate([p[0] for p in pending]))
        x = x.reshape((len(pending), *self.input_shape)).to(strategy.device)  # type: ignore[misc]
        y = torch.tensor([p[1] for p in pending], dtype=torch.long, device=strategy.device)
        start = time.perf_counter()
        result = strategy.learn(Batch(x=x, y=y, task=self._pending_task))
        self.metrics.learn_step_seconds.observe(time.perf_counter() - start)
        with self._lock:
            self._prequential.extend(result.correct.tolist())
            self.steps += 1
            self.learned += len(pending)
        self._steps_since_publish += 1
        self._learned_counter.inc(len(pending))
        self._report_held_out()
        self.metrics.prequential_accuracy.set(self.prequential_accuracy)
        # Processed up to each partition's last record: one report per partition and step.
        upto: dict[int, int] = {}
        for _, _, partition, offset in pending:
            upto[partition] = offset
        for partition, offset in self._deferred:
            if offset > upto.get(partition, -1):
                upto[partition] = offset
        self._deferred.clear()
        for partition, offset in upto.items():
            self._mark_offset(partition, offset)
        self._maybe_publish()  # per step, so a big polled chunk cannot leave serving on a stale model
        if self.evaluator is not None:
            self.evaluator.on_learned(self.learned)
        _, _, last_partition, last_offset = pending[-1]
        event = self.detector.observe_outcome(
            result.sample_losses, result.correct, last_partition, last_offset
        )
        if event is not None:
            self._boundary(event)

    def _boundary(self, event: BoundaryEvent) -> None:
        assert self.strategy is not None
        self.boundaries.append(event)
        self.trajectory.on_boundary(event.previous_task, event.task, self.strategy.model)
        self.strategy.on_boundary(
            Boundary(
                previous_task=event.previous_task,
                task=event.task,
                reason=event.reason,
                recurring=event.recurring,
            )
        )
        self._capacity_gauges()
        if event.previous_task is not None:
            self.metrics.task_boundaries.labels(reason=event.reason).inc()
            if self.scheduler is not None and self.config.checkpoint.at_boundary:
                self.scheduler.requested = True
        self.metrics.current_task.set(event.task)
        self.metrics.tasks_seen.set(len(self.detector.task_ids))
        self.log.info(
            "task_boundary",
            reason=event.reason,
            task=event.task_id,
            task_index=event.task,
            previous_task=event.previous_task,
            recurring=event.recurring,
            partition=event.partition,
            offset=event.offset,
            evidence=event.evidence,
        )
        # The model at the end of the previous task (row R[previous] of the matrix); not settled:
        # the strategy's background work (a router solve) lands in the next scheduled snapshot.
        snapshot = self.publish(settle=False)
        if self.evaluator is not None:
            self.evaluator.on_boundary(event.previous_task, event.task, snapshot, event.reason)

    def _capacity_gauges(self) -> None:
        """Strategies with finite capacity (eidetic) report it; export it after each boundary."""
        if self.strategy is None:
            return
        free = self.strategy.free_capacity()
        if free is not None:
            self.metrics.free_capacity_ratio.set(free)
            self.metrics.capacity_exhausted.set(float(self.strategy.capacity_exhausted()))

    def _unlabeled(self, partition: int, offset: int, sample: Sample) -> None:
        self.metrics.samples.labels(outcome="unlabeled").inc()
        send = self.outputs.prediction
        if send is not None:
            snap = self.holder.get()
            if snap is not None and snap.labels:
                pred = snap.predict(sample.x[None, :])
                proba = pred.proba[0]
                best = int(proba.argmax())
                send(
                    sample,
                    {
                        "label": snap.labels[best],
                        "proba": {lab: float(p) for lab, p in zip(snap.labels, proba, strict=True)},
                        "model_version": snap.version,
                    },
                )
        self._done_without_learning(partition, offset)

    def _reject(self, partition: int, offset: int, raw: bytes | memoryview, reason: str, detail: str) -> None:
        dead_letter = self.outputs.dead_letter
        if dead_letter is not None:
            dead_letter(raw, reason, detail, partition, offset)
        else:
            self.metrics.samples.labels(outcome="invalid").inc()
        self._done_without_learning(partition, offset)

    def _done_without_learning(self, partition: int, offset: int) -> None:
        """Unlabeled, held-out or invalid: processed once the pending batch before it is learned
        (marking it at once would let a commit cover earlier, still unlearned records)."""
        if self._pending:
            self._deferred.append((partition, offset))
        else:
            self._mark_offset(partition, offset)

    def _mark_offset(self, partition: int, offset: int) -> None:
        self.offsets[partition] = max(self.offsets.get(partition, 0), offset + 1)
        self.outputs.processed(partition, offset)

    # -- snapshots ------------------------------------------------------------------------------
    @property
    def prequential_accuracy(self) -> float:
        window = self._prequential
        return float(sum(window) / len(window)) if window else 0.0

    def _maybe_publish(self, force: bool = False) -> None:
        """Publish when forced, or when due by steps or time and the floor between scheduled
        snapshots (`learner.snapshot_min_interval_ms`) has passed."""
        if force:
            self.publish()
            return
        cfg, steps = self.config.learner, self._steps_since_publish
        if steps == 0:
            return
        since_ms = (time.monotonic() - self._last_publish) * 1000
        if since_ms < cfg.snapshot_min_interval_ms:
            return
        if steps >= cfg.snapshot_every_steps or since_ms >= cfg.snapshot_every_ms:
            self.publish(settle=False)

    def publish(self, settle: bool = True) -> Snapshot | None:
        """Publish an immutable snapshot of the current model (learner thread only); with `settle`
        (all but the scheduled ones) after the strategy finished its background work. Nothing is
        published before the first class: serving answers `not_ready` until then."""
        if self.strategy is None or self.input_shape is None or not self.labels:
            return None
        if settle:
            self.strategy.settle()
        self._settled = settle
        self.version += 1
        snap = build_snapshot(
            self.strategy, self.version, self.labels, self.detector.task_ids, self.input_shape
        )
        self.holder.publish(snap)
        self.metrics.model_version.set(self.version)
        self._steps_since_publish = 0
        self._last_publish = time.monotonic()
        if self.outputs.published is not None:
            self.outputs.published(self.key, self, snap)
        return snap

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the learner needs to resume exactly here (plain values and tensors only)."""
        assert self.strategy is not None and self.input_shape is not None
        return {
            "strategy_name": self.strategy.name,
            "input_shape": list(self.input_shape),
            "labels": list(self.labels),
            "version": self.version,
            "steps": self.steps,
            "learned": self.learned,
            "held_out": self.held_out,
            "prequential": list(self._prequential),
            "offsets": dict(self.offsets),
            "detector": self.detector.state_dict(),
            "strategy": self.strategy.state_dict(),
            "evaluator": None if self.evaluator is None else self.evaluator.state_dict(),
            "evaluator_summary": None if self.evaluator is None else self.evaluator.summary(),
            "trajectory": self.trajectory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output and publish the restored model."""
        if state["strategy_name"] != self.config.strategy.name:
            raise ValueError(
                f"checkpoint holds strategy {state['strategy_name']!r}, config asks for {self.config.strategy.name!r}"
            )
        self.input_shape = tuple(state["input_shape"])
        self.strategy = from_config(self.config, self.input_shape)
        self.strategy.load_state_dict(state["strategy"])
        self.labels = list(state["labels"])
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self._noted.clear()
        self.version = state["version"]
        self.steps = state["steps"]
        self.learned = state["learned"]
        self.held_out = int(state.get("held_out", 0))
        self._prequential.clear()
        self._prequential.extend(state["prequential"])
        self.offsets = {int(p): int(o) for p, o in state["offsets"].items()}
        self._accepted.reset(self.offsets)
        if self.scheduler is not None:
            self.scheduler.restored(self.learned, self.offsets)
        self.detector.load_state_dict(state["detector"])
        self.trajectory.load_state_dict(state.get("trajectory") or [])
        if self.evaluator is not None and state.get("evaluator") is not None:
            self.evaluator.load_state_dict(state["evaluator"])
        self.metrics.classes_seen.set(len(self.labels))
        self.metrics.tasks_seen.set(len(self.detector.task_ids))
        self._capacity_gauges()
        if self.detector.current is not None:
            self.metrics.current_task.set(self.detector.current)
        self.publish()

    def _checkpoint_if_due(self) -> None:
        if self.scheduler is not None and self.strategy is not None and self.scheduler.due(self.learned):
            self.checkpoint(wait=not self._background_checkpoints)

    def checkpoint(self, wait: bool = True) -> bool:
        """Learn any partial batch, then write model + state + offsets atomically (learner thread).
        False (serving goes on) when there is nowhere to write or the write fails; `wait=False`
        writes in the background (`CheckpointScheduler.write`)."""
        scheduler = self.scheduler
        if scheduler is None or self.strategy is None:
            return False
        scheduler.finish_pending()
        self._learn_pending()  # the offsets saved must cover exactly what the model has learned
        evaluated = self.evaluator.revision if self.evaluator is not None else 0
        if scheduler.unchanged(self.learned, self.offsets, evaluated):
            return True  # nothing new since the last checkpoint
        return scheduler.write(self.state_dict, self.offsets, self.learned, wait, evaluated)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "learned": self.learned,
                "held_out": self.held_out,
                "steps": self.steps,
                "model_version": self.version,
                "classes": len(self.labels),
                "tasks": len(self.detector.task_ids),
                "current_task": None
                if self.detector.current is None
                else self.detector.task_ids[self.detector.current],
                "prequential_accuracy": self.prequential_accuracy,
                # a snapshot taken before the strategy's background work finished counts as one
                "unpublished_steps": self._steps_since_publish + bool(self._pending) + (not self._settled),
            }
