"""Kafka source: a consumer in a group, batched polls, decoding, dead letters, manual commits.

kafka-python's consumer is not thread-safe, so one thread (the source thread) owns it: it polls,
decodes, dead-letters invalid messages and hands decoded records to the learner through a bounded
queue. The learner reports how far it has *processed* each partition; the source thread commits
exactly those offsets, never the ones merely fetched, so a crash re-reads unprocessed samples.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from stream_cl.config import KafkaConfig
from stream_cl.ingest.chunk import Chunk, ChunkBuilder
from stream_cl.ingest.chunk import Record as Record  # re-exported: what callers of the source hand over
from stream_cl.ingest.codec import InvalidSample, decode_sample
from stream_cl.ingest.sinks import dead_letter_headers, kafka_producer
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics

# Work for the learner thread that must run in stream order, after every record queued before it
# (e.g. a rebalance handover: checkpoint the models of revoked partitions).
LearnerTask = Callable[[], None]
QueueItem = Chunk | LearnerTask
# Sends one message to the dead-letter topic: (original bytes, reason, detail, partition, offset).
DeadLetter = Callable[[bytes | memoryview | None, str, str, int, int], None]


class KafkaSource:
    """Owns the consumer and the dead-letter producer; runs `run()` on its own thread."""

    def __init__(
        self,
        config: KafkaConfig,
        out: queue.Queue[QueueItem],
        metrics: Metrics,
        expected_size: Callable[[], int | None] = lambda: None,
        max_features: int = 1 << 20,
        on_revoke: Callable[[list[int], bool], None] | None = None,
        on_assign: Callable[[list[int]], dict[int, int]] | None = None,
    ) -> None:
        """`on_revoke(partitions, lost)` and `on_assign(partitions) -> {partition: offset to seek}`
        run inside the consumer's rebalance (which blocks `poll`, so nothing new is queued meanwhile).
        With them set, the hooks own where partitions resume and this source forgets the progress of
        revoked partitions (it never commits them again); without them, a partition resumes at a
        restored checkpoint's offset (`resume_from`), else at this source's own progress.
        """
        self.config = config
        self.on_revoke = on_revoke
        self.on_assign = on_assign
        self.out = out
        self.metrics = metrics
        self.expected_size = expected_size
        self.max_features = max_features
        self.log = get_logger("stream_cl.ingest.source")
        self.stop_event = threading.Event()
        self._processed: dict[int, int] = {}  # partition -> next offset to read (learner-owned)
        self._committed: dict[int, int] = {}
        self._seek_on_assign: dict[int, int] = {}  # offsets from a restored checkpoint
        # partitions this member holds now, kept by the rebalance listener (with the fetcher in a
        # child process too, where `consumer` is None here)
        self.assigned: set[int] = set()
        self._commit_now = threading.Event()
        self._backoff = 0.0  # seconds to wait after the last failed poll (doubles, capped at 5)
        # Between a revoke and the next assignment: kafka-python 3 wedges the rejoin (it never
        # completes) if `committed()` is called meanwhile, so the lag update waits.
        self._rebalancing = False
        self._lock = threading.Lock()
        self.consumer: KafkaConsumer | None = None
        self._dead_letters: KafkaProducer | None = None
        self.dead_lettered = 0
        self.error: BaseException | None = None

    # -- called from the learner thread ---------------------------------------------------------
    def mark_processed(self, partition: int, offset: int) -> None:
        """The learner finished the record at `offset`; commit may advance past it."""
        with self._lock:
            if offset + 1 > self._processed.get(partition, -1):
                self._processed[partition] = offset + 1

    def forget(self, partitions: list[int]) -> None:
        """Drop the progress of partitions this consumer gave up: their new owner commits them."""
        with self._lock:
            for p in partitions:
                self._processed.pop(p, None)
                self._committed.pop(p, None)

    def request_commit(self) -> None:
        """Commit the processed offsets at the next poll (called after each checkpoint)."""
        self._commit_now.set()

    def resume_from(self, offsets: dict[int, int]) -> None:
        """Start each partition at a restored checkpoint's offset when it is assigned (before connect)."""
        self._seek_on_assign = dict(offsets)
        with self._lock:
            self._processed.update(offsets)

    # -- the source thread ----------------------------------------------------------------------
    def connect(self) -> None:
        c = self.config
        self.consumer = KafkaConsumer(
            bootstrap_servers=c.bootstrap_servers.split(","),
            group_id=c.group_id,
            enable_auto_commit=False,
            auto_offset_reset=c.auto_offset_reset,
            max_poll_records=c.max_poll_records,
            max_poll_interval_ms=c.max_poll_interval_ms,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=max(1000, c.session_timeout_ms // 3),
            fetch_max_bytes=c.fetch_max_bytes,
            max_partition_fetch_bytes=c.max_partition_fetch_bytes,
            fetch_min_bytes=1,
            fetch_max_wait_ms=100,
        )
        self.consumer.subscribe([c.topic], listener=_SeekOnAssign(self))
        # Created up front: both the source and the learner thread dead-letter (the producer is thread-safe).
        self._dead_letters = kafka_producer(c, durable=True)

    def run(self) -> None:
        """The source thread: fetch, hand records to the learner, commit and report lag on schedule."""
        try:
            self._connect_once()
            last_commit = last_lag = time.monotonic()
            while not self.stop_event.is_set():
                if not self._fetch():
                    continue  # nothing to commit or report after a failed fetch
                now = time.monotonic()
                if self._commit_now.is_set() or now - last_commit >= self.config.commit_interval_s:
                    self._commit_now.clear()
                    self.commit()
                    last_commit = now
                if now - last_lag >= 1.0:
                    self._update_lag()
                    last_lag = now
        except BaseException as e:  # reported to the daemon, which decides to stop
            self.error = e
            self.log.exception("source_failed")
        finally:
            self.stop_event.set()

    def _connect_once(self) -> None:
        if self.consumer is None:
            self.connect()

    def _fetch(self) -> bool:
        """One poll; its records go to the learner. False after a failed poll (backed off)."""
        try:
            polled = self.consumer.poll(timeout_ms=self.config.poll_timeout_ms)  # type: ignore[union-attr]
            self._backoff = 0.0
        except KafkaError as e:  # broker away, rebalance, ...: kafka-python reconnects; we back off
            self._backoff = min(5.0, max(0.1, self._backoff * 2))
            self.metrics.source_errors.labels(kind="poll").inc()
            self.log.warning("kafka_poll_failed", error=str(e), retry_in_s=self._backoff)
            self.stop_event.wait(self._backoff)
            return False
        decoded = self._decode(polled)
        if len(decoded):
            self._put(decoded.build())
        return True

    def _put(self, chunk: Chunk) -> None:
        while not self.stop_event.is_set():
            try:
                self.out.put(chunk, timeout=0.2)
                return
            except queue.Full:
                continue

    def _decode(self, polled: dict[TopicPartition, list[Any]]) -> ChunkBuilder:
        """Decode a poll; invalid messages are dead-lettered here and forwarded, marked invalid."""
        builder = ChunkBuilder()
        expected = self.expected_size()
        for tp, messages in polled.items():
            partition = tp.partition
            for m in messages:
                try:
                    sample = decode_sample(m.value, expected, self.max_features)
                except InvalidSample as e:
                    self.dead_letter(m.value, e.reason, e.detail, partition, m.offset)
                    builder.add_invalid(partition, m.offset, m.key, e.reason)
                    continue
                builder.add(partition, m.offset, m.key, sample, m.value)
        return builder

    def dead_letter(
        self, value: bytes | memoryview | None, reason: str, detail: str, partition: int, offset: int
    ) -> None:
        """Send the original bytes and the reason to the dead-letter topic; count it."""
        assert self._dead_letters is not None, "connect() first"
        headers = dead_letter_headers(reason, detail, self.config.topic, partition, offset)
        self._dead_letters.send(
            self.config.dead_letter_topic, value=bytes(value) if value else b"", headers=headers
        )
        self.dead_lettered += 1
        self.metrics.samples.labels(outcome="invalid").inc()
        self.metrics.dead_letters.labels(reason=reason).inc()
        self.log.warning(
            "sample_dead_lettered", reason=reason, detail=detail[:200], partition=partition, offset=offset
        )

    def commit(self) -> None:
        """Commit the offsets the learner has processed (source thread only)."""
        if self.consumer is None:
            return
        with self._lock:
            todo = {p: o for p, o in self._processed.items() if self._committed.get(p) != o}
        if not todo:
            return
        if self._dead_letters is not None:
            self._dead_letters.flush(timeout=10)  # a dead letter must be durable before its offset is
        offsets = {
            TopicPartition(self.config.topic, p): OffsetAndMetadata(o, "", -1) for p, o in todo.items()
        }
        try:
            self.consumer.commit(offsets)
        except KafkaError as e:  # e.g. a rebalance in progress: keep the offsets and retry later
            self.metrics.source_errors.labels(kind="commit").inc()
            self.log.warning(
                "offset_commit_failed", error=str(e), offsets={str(p): o for p, o in todo.items()}
            )
            self._commit_now.set()
            return
        self._committed.update(todo)
        self.log.debug("offsets_committed", offsets={str(p): o for p, o in todo.items()})

    def _update_lag(self) -> None:
        consumer = self.consumer
        if consumer is None or self._rebalancing:
            return
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            with self._lock:
                done = self._processed.get(tp.partition)
            if done is None:
                done = consumer.committed(tp) or 0
            self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(max(0, high - done))

    def close(self) -> None:
        """Final commit, then close the consumer and producer (source thread, after `run`)."""
        try:
            self.commit()
        finally:
            if self._dead_letters is not None:
                self._dead_letters.flush(timeout=10)
                self._dead_letters.close(timeout=5)
            if self.consumer is not None:
                self.consumer.close(autocommit=False)


class _SeekOnAssign(ConsumerRebalanceListener):
    """Seeks newly assigned partitions where they resume; runs the source's rebalance hooks.

    kafka-python calls it inside `poll` (and `close`), while the source thread waits: offsets must
    not be committed here (a commit inside the callback wedges polling), so the hooks only hand work
    to the learner thread and wait for it, bounded by the rebalance timeout.
    """

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._revoke(revoked, lost=False)

    def on_partitions_lost(self, lost: Any) -> None:
        """Evicted from the group: the partitions may already be someone else's, nothing is saved."""
        self._revoke(lost, lost=True)

    def _revoke(self, revoked: Any, lost: bool) -> None:
        source = self.source
        source._rebalancing = True
        partitions = sorted(tp.partition for tp in revoked)
        source.assigned.difference_update(partitions)
        source.log.info("partitions_lost" if lost else "partitions_revoked", partitions=partitions)
        if source.on_revoke is None or not partitions:
            return
        try:
            source.on_revoke(partitions, lost)
        except Exception:  # never let a hook break the consumer's rebalance
            source.log.exception("revoke_hook_failed", partitions=partitions)
        source.forget(partitions)

    def on_partitions_assigned(self, assigned: Any) -> None:
        source = self.source
        consumer = source.consumer
        assert consumer is not None
        partitions = sorted(tp.partition for tp in assigned)
        source.assigned.update(partitions)
        if source.on_assign is not None:
            try:
                offsets = source.on_assign(partitions)
            except Exception:
                source.log.exception("assign_hook_failed", partitions=partitions)
                offsets = {}
            for tp in assigned:
                if tp.partition in offsets:
                    consumer.seek(tp, offsets[tp.partition])
            # Everything before a resume position is in the models already: it is processed, and
            # committed at the next poll, so the group's lag is true before any new record arrives.
            with source._lock:
                for p, offset in offsets.items():
                    if offset > source._processed.get(p, -1):
                        source._processed[p] = offset
            if offsets:
                source.request_commit()
            source.log.info("partitions_assigned", partitions=partitions, resume_at=offsets)
            source._rebalancing = False
            return
        for tp in assigned:
            # A restored checkpoint's offset first; else our own progress, which may be ahead of the
            # last commit (the learner skips anything at an offset it already processed anyway).
            offset = source._seek_on_assign.pop(tp.partition, None)
            if offset is None:
                with source._lock:
                    offset = source._processed.get(tp.partition)
            if offset is not None:
                consumer.seek(tp, offset)
                source.log.info("partition_resumed_from_checkpoint", partition=tp.partition, offset=offset)
        source.log.info("partitions_assigned", partitions=partitions)
        source._rebalancing = False
