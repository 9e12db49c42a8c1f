"""Many models, many daemons: one model per Kafka message key (`models.per_key = true`).

`KeyedModels` takes the learner thread's place of the single `Learner`: it routes each record to
its key's `Learner` (created, or loaded from the shared store, on the key's first record), and
moves models between the daemons of a consumer group on a rebalance:

- revoke (`on_revoke`, inside the consumer's rebalance): a handover task goes through the
  learner's queue behind every record fetched so far; the learner thread learns those, checkpoints
  every model of the revoked partitions to the shared store, writes the partitions' manifests
  (store/keyed_store.py) and parks the models; the rebalance waits for it, bounded by the rebalance
  timeout. Offsets are never committed inside the rebalance.
- assign (`on_assign`): each partition resumes at its manifest's `next_offset`; the learner thread
  then loads the manifest's models (a parked model whose newest checkpoint is still the one this
  daemon wrote is kept as it is: kafka-python's eager rebalance revokes everything first) and
  drops the parked models it did not get back.

Exactly once: a key's model drops records at offsets its checkpoint already covers (the Learner's
per-partition offsets), and a manifest's `next_offset` never passes a record that is not in its
key's checkpoint. A crashed daemon's successor resumes from the last manifest and checkpoints.

Bounds: at most `models.max_keys` models in memory (a further key's messages are dead-lettered,
`too_many_keys`); per-key learners hold out nothing (no evaluator per key); per-model gauges show
the model that last changed and no series is labelled by key.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from stream_cl.config import Config
from stream_cl.evaluate.models import KeyedEvaluation
from stream_cl.ingest.chunk import Chunk, Record
from stream_cl.ingest.source import QueueItem
from stream_cl.learn.keys import InvalidKey, model_key, per_key_config
from stream_cl.learn.learner import Learner
from stream_cl.learn.offsets import OffsetTracker
from stream_cl.learn.outputs import LearnerOutputs
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.store.checkpoints import CheckpointError
from stream_cl.store.keyed_store import KeyCheckpointStore, PartitionManifest, SharedModelStore


@dataclass(eq=False)
class KeyedModel:
    key: str
    learner: Learner
    store: KeyCheckpointStore
    partitions: set[int] = field(default_factory=set)
    # per partition: the next offset the model takes in (lower ones it has: dropped, exactly once),
    # and the first offset it took in since its newest checkpoint
    taken: OffsetTracker = field(default_factory=OffsetTracker)
    unsaved_from: dict[int, int] = field(default_factory=dict)


class _Handover:
    """A revoke handover's state, shared by the waiting rebalance and the learner thread running it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.state = "pending"  # -> running -> done, or pending -> abandoned (the rebalance gave up waiting)

    def begin(self) -> bool:
        with self._changed:
            if self.state != "pending":
                return False
            self.state = "running"
            return True

    def finish(self) -> None:
        with self._changed:
            self.state = "done"
            self._changed.notify_all()

    def wait(self, timeout: float) -> str:
        """Wait for the learner; abandon the handover if it has not begun by then. Returns the state."""
        with self._changed:
            self._changed.wait_for(lambda: self.state == "done", timeout)
            if self.state == "pending":
                self.state = "abandoned"
            return self.state


class KeyedModels:
    """The models of the keys in this daemon's partitions; only the learner thread calls `process`/`flush`."""

    def __init__(
        self,
        config: Config,
        registry: SnapshotRegistry,
        metrics: Metrics,
        tasks: queue.Queue[QueueItem],
        store: SharedModelStore,
        outputs: LearnerOutputs | None = None,
    ) -> None:
        """`outputs`: the daemon's. Each key's learner sends its dead letters, predictions (with
        its key) and snapshots there; the partitions' progress goes to `processed`, and each
        manifest written to `checkpointed` (the partition's checkpoint: commit it)."""
        self.config = config
        self.model_config = per_key_config(config)
        self.registry = registry
        self.metrics = metrics
        self.tasks = tasks
        self.store = store
        self.max_keys = config.models.max_keys
        self.outputs = outputs if outputs is not None else LearnerOutputs()
        self.evaluation = (
            KeyedEvaluation(config.evaluation, metrics, config.metrics.max_model_labels)
            if config.evaluation.holdout_fraction > 0
            else None
        )
        # Called (key, partition, offset) on the learner thread for each record handed to a model
        # (once per record and model: lower offsets are dropped). For observers, e.g. exactly-once tests.
        self.on_routed: Callable[[str, int, int], None] | None = None
        self.writer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.log = get_logger("stream_cl.learn.keyed")
        # the rebalance must end well within the group's rebalance and session timeouts
        kafka = config.kafka
        self.handover_timeout_s = 0.5 * min(kafka.max_poll_interval_ms, kafka.session_timeout_ms) / 1000
        self._models: dict[str, KeyedModel] = {}
        self._parked: dict[str, KeyedModel] = {}  # given up, checkpointed, maybe assigned back
        self._accepted = OffsetTracker()  # per partition, the next offset not yet routed
        self._partition_keys: dict[int, set[str]] = {}  # partition -> keys whose models learned from it
        self._manifests: dict[int, tuple[int, tuple[str, ...]]] = {}  # partition -> last written
        self._manifests_due = False
        self._revoked: frozenset[int] = frozenset()  # handovers abandoned: drop their records
        self.assigned: frozenset[int] = frozenset()  # the partitions the group gave this daemon
        self._touched: set[str] = set()  # keys with records since the last flush
        self._last_sweep = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()  # guards _models for readers on other threads
        self.models_gauge = Gauge(
            "stream_cl_models", "Models this daemon holds (models.per_key).", registry=metrics.registry
        )
        self.handovers = Counter(
            "stream_cl_model_handovers",
            "Models given up to the shared store (out) or loaded from it (in) on rebalances.",
            ["direction"],
            registry=metrics.registry,
        )
        for direction in ("in", "out"):
            self.handovers.labels(direction=direction)

    # -- the learner thread -----------------------------------------------------------------------
    def process(self, chunk: Chunk | list[Record]) -> None:
        """Route one polled chunk to the keys' models (each key's records in stream order)."""
        if not isinstance(chunk, Chunk):
            chunk = Chunk.of(chunk)
        by_key: dict[str, list[int]] = {}  # key -> the indices of its messages in the chunk
        revoked = self._revoked
        on_routed = self.on_routed
        take = self._accepted.take
        for i, p, offset, raw_key, invalid in zip(
            range(len(chunk)), chunk.partitions, chunk.offsets, chunk.keys, chunk.invalid, strict=True
        ):
            if p in revoked:  # its handover was abandoned: the new owner learns it
                continue
            if not take(p, offset):
                continue  # routed already (a re-delivery after a seek)
            if invalid is not None:  # dead-lettered by the source
                continue
            try:
                key = model_key(raw_key)
            except InvalidKey as e:
                self.dead_letter(chunk.raw(i), e.reason, e.detail, p, offset)
                continue
            model = self._models.get(key)
            if model is None:
                model = self._activate(key)
                if model is None:
                    self.dead_letter(
                        chunk.raw(i),
                        "too_many_keys",
                        f"key {key[:100]!r} would be model {self.max_keys + 1} here (models.max_keys)",
                        p,
                        offset,
                    )
                    continue
            if not model.taken.take(p, offset):
                continue  # in the model already (its checkpoint's offsets, or learned here)
            if p not in model.partitions:
                model.partitions.add(p)
                self._partition_keys.setdefault(p, set()).add(key)
            model.unsaved_from.setdefault(p, offset)
            by_key.setdefault(key, []).append(i)
            if on_routed is not None:
                on_routed(key, p, offset)
        for key, indices in by_key.items():
            self._models[key].learner.process(chunk.select(indices))
            self._touched.add(key)
        self._housekeeping()

    def flush(self) -> None:
        """The stream went quiet: learn every partial batch and publish."""
        for key in self._touched:
            model = self._models.get(key)
            if model is not None:
                model.learner.flush()
        self._touched.clear()
        self._housekeeping()

    def start(self) -> None:
        """The evaluator thread the models share."""
        if self.evaluation is not None:
            self.evaluation.start()

    def close(self, final: bool = True) -> None:
        """At shutdown, after the learner thread stopped (`final`): checkpoint every model, write
        the manifests. Not final: nothing, a model may be inside a step."""
        if self.evaluation is not None:
            self.evaluation.stop()
        if not final:
            return
        self._closed = True
        for model in list(self._models.values()):
            model.learner.flush()
            if model.learner.evaluator is not None:
                model.learner.evaluator.stop()  # scores the boundary rows still waiting: saved below
            self._save(model)
        self._write_manifests(list(self._accepted))

    def _housekeeping(self) -> None:
        revoked = self._revoked
        if revoked and (
            revoked & self._accepted.partitions()
            or any(m.partitions & revoked for m in self._models.values())
        ):
            self._give_up(sorted(revoked), save=False)  # an abandoned handover: drop, save nothing
        every_s = self.config.checkpoint.every_s
        if every_s > 0 and time.monotonic() - self._last_sweep >= every_s:
            # a key that went quiet must not hold the manifests back: checkpoint what it learned
            self._last_sweep = time.monotonic()
            for model in list(self._models.values()):
                if model.unsaved_from:
                    self._save(model)
        if self._manifests_due:
            self._write_manifests(list(self._accepted))

    def dead_letter(
        self, raw: bytes | memoryview | None, reason: str, detail: str, partition: int, offset: int
    ) -> None:
        """A record no model takes (bad key, too many keys): to the daemon's dead letters, else counted."""
        send = self.outputs.dead_letter
        if send is not None:
            send(raw, reason, detail, partition, offset)
        else:
            self.metrics.samples.labels(outcome="invalid").inc()

    # -- models ------------------------------------------------------------------------------------
    def _activate(self, key: str) -> KeyedModel | None:
        """`key`'s model: parked here, else loaded from the shared store, else new; None past max_keys."""
        if len(self._models) >= self.max_keys:
            return None
        model = self._parked.pop(key, None)
        if model is not None and not model.store.newest_is_mine():
            model = None  # another daemon learned it since: load theirs
        if model is None:
            model = self._load(key)
        elif self.evaluation is not None and model.learner.evaluator is not None:
            self.evaluation.track(key, model.learner.evaluator)  # parked and assigned back
        with self._lock:
            self._models[key] = model
        self.models_gauge.set(len(self._models))
        return model

    def _load(self, key: str) -> KeyedModel:
        store = self.store.key_store(key)
        out = self.outputs
        send = out.prediction
        evaluation = self.evaluation
        learner = Learner(
            self.model_config,
            self.registry.holder(key),
            self.metrics,
            LearnerOutputs(
                dead_letter=self.dead_letter,
                prediction=None
                if send is None
                else lambda sample, prediction: send(sample, {**prediction, "key": key}),
                published=out.published,
                checkpointed=lambda offsets: self._saved(key, offsets),
            ),
            checkpoints=store,
            key=key,
            make_evaluator=None
            if evaluation is None
            else lambda holder, task_id_of, seed: evaluation.evaluator(key, holder, task_id_of, seed),
        )
        model = KeyedModel(key, learner, store)
        try:
            found = store.load_latest()
        except CheckpointError as e:  # a checkpoint of another key in this key's directory
            self.log.error("key_checkpoint_refused", key=key, error=str(e))
            found = None
        if found is not None:
            state, path = found
            learner.load_state_dict(state)
            model.taken = OffsetTracker(learner.offsets)
            model.partitions = set(learner.offsets)
            self.handovers.labels(direction="in").inc()
            self.log.info(
                "model_loaded", key=key, path=str(path), learned=learner.learned, offsets=learner.offsets
            )
        return model

    def _saved(self, key: str, offsets: dict[int, int]) -> None:
        """A key's checkpoint holds everything its model took in (Learner.checkpoint learns the rest first)."""
        model = self._models.get(key)
        if model is not None:
            model.unsaved_from.clear()
            self._manifests_due = True

    def _save(self, model: KeyedModel) -> bool:
        """Checkpoint `model` (learning its partial batch first); False if the write failed."""
        if model.learner.strategy is None:  # nothing learnable arrived: nothing to keep
            model.unsaved_from.clear()
            return True
        if not model.learner.checkpoint():
            return False
        model.unsaved_from.clear()
        self._manifests_due = True
        return True

    def _write_manifests(self, partitions: list[int]) -> None:
        self._manifests_due = False
        for p in partitions:
            if p not in self._accepted or p in self._revoked:
                continue
            next_offset = self._accepted.next_offset(p)
            for model in self._models.values():
                unsaved = model.unsaved_from.get(p)
                if unsaved is not None and unsaved < next_offset:
                    next_offset = unsaved
            keys = tuple(sorted(self._partition_keys.get(p, ())))
            if self._manifests.get(p) == (next_offset, keys):
                continue
            try:
                self.store.write_manifest(PartitionManifest(p, next_offset, keys), self.writer)
            except OSError as e:  # the older manifest stays, and is still correct: retried later
                self.metrics.checkpoint_failures.inc()
                self.log.error("partition_manifest_failed", partition=p, error=str(e))
                self._manifests_due = True
                continue
            self._manifests[p] = (next_offset, keys)
            if next_offset > 0:
                self.outputs.processed(p, next_offset - 1)  # committed to Kafka for lag monitoring
                self.outputs.checkpointed({p: next_offset})

    def _give_up(self, partitions: list[int], save: bool) -> None:
        """Checkpoint (if `save`) and park the models of `partitions`; their new owner loads them."""
        gone = set(partitions)
        leaving = [m for m in self._models.values() if m.partitions & gone]
        saved: set[str] = set()
        if save:
            for model in leaving:
                model.learner.flush()
                if self._save(model):
                    saved.add(model.key)
            self._write_manifests(partitions)
        with self._lock:
            for model in leaving:
                del self._models[model.key]
        for model in leaving:
            self._touched.discard(model.key)
            if self.evaluation is not None:
                self.evaluation.remove(model.key)  # its figures are its new owner's to export
            if model.key in saved:
                self._parked[model.key] = model  # still served until the assignment is known
            else:
                self.registry.remove(model.key)
        for p in gone:
            self._accepted.forget(p)
            self._partition_keys.pop(p, None)
            self._manifests.pop(p, None)
        self.models_gauge.set(len(self._models))
        self.handovers.labels(direction="out").inc(len(saved))
        self.log.info(
            "models_given_up", partitions=sorted(gone), saved=sorted(saved), dropped=len(leaving) - len(saved)
        )

    def _take_over(self, partitions: list[int], manifests: dict[int, PartitionManifest]) -> None:
        """Resume `partitions` where their manifests say; load (or keep) their models."""
        self._revoked = self._revoked - set(partitions)
        wanted: set[str] = set()
        for p in partitions:
            manifest = manifests.get(p)
            if manifest is not None:
                self._accepted.resume(p, manifest.next_offset)
                self._partition_keys[p] = set(manifest.keys)
                self._manifests[p] = (manifest.next_offset, manifest.keys)
                wanted.update(manifest.keys)
        wanted.update(k for k, m in self._parked.items() if m.partitions & set(partitions))
        skipped = []
        for key in sorted(wanted):
            if key not in self._models and self._activate(key) is None:
                skipped.append(key)
        for key in self._parked:  # not assigned back: its new owner serves it
            self.registry.remove(key)
        self._parked.clear()
        if skipped:
            self.log.warning("models_not_loaded", reason="models.max_keys", keys=len(skipped))
        self.log.info("partitions_taken_over", partitions=partitions, models=len(self._models))

    # -- the rebalance (the consumer's thread, while the source thread waits in poll) ---------------
    def on_revoke(self, partitions: list[int], lost: bool) -> None:
        """Hand `partitions`' models over: wait (bounded) for the learner to checkpoint and park them."""
        self.assigned = self.assigned - set(partitions)
        if self._closed:
            return  # shutdown already saved everything (close), the consumer is leaving the group
        if lost:  # evicted: the partitions may be learned elsewhere already; save nothing
            self._revoked = self._revoked | set(partitions)
            self._submit(lambda: self._give_up(partitions, save=False), self.handover_timeout_s)
            return
        handover = _Handover()

        def run() -> None:
            if not handover.begin():
                self._give_up(partitions, save=False)
                return
            try:
                self._give_up(partitions, save=True)
            finally:
                handover.finish()

        start = time.monotonic()
        submitted = self._submit(run, self.handover_timeout_s)
        state = handover.wait(
            max(0.0, start + self.handover_timeout_s - time.monotonic()) if submitted else 0.0
        )
        if state == "running":  # begun: checkpoint writes under way, let them finish (bounded)
            state = handover.wait(self.handover_timeout_s)
        if state != "done":
            # Too slow (or the learner is gone): drop what the learner still holds of these partitions;
            # their new owner resumes from the last manifest and checkpoints.
            self._revoked = self._revoked | set(partitions)
            self.log.warning("handover_timed_out", partitions=partitions, state=state)
        else:
            self.log.info("handover_done", partitions=partitions, seconds=round(time.monotonic() - start, 3))

    def on_assign(self, partitions: list[int]) -> dict[int, int]:
        """Where each assigned partition resumes (its manifest); the learner then loads the models."""
        manifests = {p: m for p in partitions if (m := self.store.read_manifest(p)) is not None}
        self._submit(lambda: self._take_over(partitions, manifests), self.handover_timeout_s)
        self.assigned = self.assigned | set(partitions)
        return {p: m.next_offset for p, m in manifests.items()}

    def _submit(self, task: Callable[[], None], timeout: float) -> bool:
        try:
            self.tasks.put(task, timeout=timeout)
            return True
        except queue.Full:
            self.log.error("learner_queue_full", waited_s=timeout)
            return False

    # -- readers (any thread) ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def learned_by_key(self) -> dict[str, int]:
        with self._lock:
            models = list(self._models.values())
        return {m.key: m.learner.stats()["learned"] for m in models}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            models = list(self._models.values())
        per_model = [m.learner.stats() for m in models]
        return {
            "models": len(models),
            "learned": sum(s["learned"] for s in per_model),
            "steps": sum(s["steps"] for s in per_model),
            "unpublished_steps": sum(s["unpublished_steps"] for s in per_model),
        }
