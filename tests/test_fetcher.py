"""The process-based fetcher (kafka.fetch_in_subprocess) on the real broker: nothing lost or
duplicated, the same samples as in-process decoding, dead letters, commits, and rebalance calls
forwarded in order with the records."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from support import kafka_overrides, wait_until

from stream_cl.config import load_config
from stream_cl.ingest.codec import decode_sample, encode_sample
from stream_cl.ingest.fetcher import ProcessSource
from stream_cl.ingest.source import Chunk, KafkaSource, QueueItem, Record
from stream_cl.metrics import Metrics
from stream_cl.runtime.daemon import Daemon
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import load_stream
from stream_cl.tools.producer import consume_all, produce_stream


class Drain:
    """Plays the learner: takes records (and rebalance tasks) in order and marks them processed."""

    def __init__(self, out: queue.Queue[QueueItem], source: ProcessSource, log: list[Any]) -> None:
        self.out, self.source, self.log = out, source, log
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.out.get(timeout=0.05)
            except queue.Empty:
                continue
            if not isinstance(item, Chunk):
                item()
                continue
            for rec in item.records():
                self.log.append(rec)
                self.source.mark_processed(rec.partition, rec.offset)


def _source(
    bootstrap: str, topic: str, kind: type[KafkaSource] = ProcessSource, **kwargs: Any
) -> tuple[Any, queue.Queue[QueueItem]]:
    config = load_config(
        None, [*kafka_overrides(bootstrap, topic), "kafka.commit_interval_s=0.5"], env={}
    ).kafka
    out: queue.Queue[QueueItem] = queue.Queue(maxsize=8)
    return kind(config, out, Metrics(), **kwargs), out


@pytest.mark.parametrize("kind", [ProcessSource, KafkaSource], ids=["subprocess", "in_process"])
def test_every_message_arrives_once_decoded_like_in_process(
    broker: EmbeddedBroker, topic: str, kind: type[KafkaSource]
) -> None:
    """Three partitions, valid and malformed messages: each offset arrives exactly once (in the
    learner's chunks), valid ones with exactly `decode_sample`'s result and their original bytes,
    invalid ones dead-lettered; processed offsets get committed. Both fetch modes."""
    broker.create_topic(f"{topic}-p3", partitions=3)
    topic = f"{topic}-p3"
    rng = np.random.default_rng(0)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    sent: dict[tuple[int, int], bytes] = {}
    futures = []
    for i in range(600):
        if i % 97 == 13:
            value = b"\xc1 not msgpack" if i % 2 else msgpack.packb({"x": [float("nan")] * 8, "y": 1})
        elif i % 5 == 0:  # x as a number array, string labels
            value = msgpack.packb({"x": rng.random(8).tolist(), "y": f"c{i % 3}", "id": i, "ts": 1.5})
        else:
            value = encode_sample(rng.random(8, dtype=np.float32), i % 4, task="t", id=i, shape=(2, 4))
        futures.append((value, producer.send(topic, value, key=str(i % 7).encode())))
    producer.flush()
    for value, fut in futures:
        meta = fut.get(timeout=10)
        sent[(meta.partition, meta.offset)] = value
    producer.close()

    source, out = _source(broker.bootstrap_servers, topic, kind)
    got: list[Record] = []
    drain = Drain(out, source, got)
    source.connect()
    thread = threading.Thread(target=source.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(got) >= len(sent), 60, "every message")
        time.sleep(0.5)  # anything duplicated would arrive now
        source.request_commit()
        wait_until(
            lambda: all(source._committed.get(p) == 1 + max(o for q, o in sent if q == p) for p in range(3)),
            30,
            "the processed offsets committed",
        )
    finally:
        source.stop_event.set()
        thread.join(10)
        source.close()
        drain.stop.set()
    assert source.error is None
    keys = [(r.partition, r.offset) for r in got]
    assert len(keys) == len(set(keys)) == len(sent)
    assert set(keys) == set(sent)
    invalid = 0
    for rec in got:
        value = sent[(rec.partition, rec.offset)]
        assert rec.key is not None
        try:
            want = decode_sample(value)
        except Exception:
            invalid += 1
            assert rec.sample is None
            continue
        assert rec.sample is not None and rec.raw == value
        assert rec.sample.x.dtype == np.float32 and np.array_equal(rec.sample.x, want.x)
        assert (rec.sample.y, rec.sample.task, rec.sample.id, rec.sample.ts, rec.sample.shape) == (
            want.y,
            want.task,
            want.id,
            want.ts,
            want.shape,
        )
    assert invalid == source.dead_lettered == 7
    dead = consume_all(broker.bootstrap_servers, f"{topic}.dlq", timeout_s=10)
    assert len(dead) == 7
    assert {dict(r.headers)["stream_cl.reason"] for r in dead} == {b"not_msgpack", b"not_finite"}


def test_rebalances_are_forwarded_in_order_and_seeks_applied(broker: EmbeddedBroker, topic: str) -> None:
    """A second group member takes a partition: the hooks run in the parent, in stream order with the
    records (a revoke task queued by the hook runs after every record fetched before it), and the
    offsets `on_assign` returns are where the child resumes."""
    topic = f"{topic}-rb"
    broker.create_topic(topic, partitions=2)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    for i in range(200):
        producer.send(topic, encode_sample(np.full(4, i, np.float32), 0, id=i), partition=i % 2)
    producer.flush()
    producer.close()

    log: list[Any] = []
    out_holder: list[queue.Queue[QueueItem]] = []

    def on_revoke(partitions: list[int], lost: bool) -> None:
        done = threading.Event()

        def task() -> None:  # like the daemon's handover: runs on the learner side, in order
            log.append(("revoke", tuple(partitions)))
            done.set()

        out_holder[0].put(task)
        assert done.wait(30)

    def on_assign(partitions: list[int]) -> dict[int, int]:
        log.append(("assign", tuple(partitions)))
        return {p: 50 for p in partitions}  # resume every assigned partition at offset 50

    a, out_a = _source(broker.bootstrap_servers, topic, on_revoke=on_revoke, on_assign=on_assign)
    out_holder.append(out_a)
    drain_a = Drain(out_a, a, log)
    a.connect()
    thread_a = threading.Thread(target=a.run, daemon=True)
    thread_a.start()
    b, out_b = _source(broker.bootstrap_servers, topic)
    drain_b = Drain(out_b, b, [])

    def records_after(i: int) -> list[Record]:
        return [r for r in log[i:] if isinstance(r, Record)]

    try:
        wait_until(lambda: len(records_after(0)) >= 100, 60, "a to read both partitions")
        b.connect()
        thread_b = threading.Thread(target=b.run, daemon=True)
        thread_b.start()
        wait_until(
            lambda: sum(1 for e in log if isinstance(e, tuple) and e[0] == "assign") >= 2, 60, "a rebalance"
        )
        second = max(i for i, e in enumerate(log) if isinstance(e, tuple) and e[0] == "assign")
        wait_until(lambda: len(records_after(second)) >= 50, 60, "a to re-read its partition from offset 50")
        assert a.assigned == set(log[second][1])  # what each member holds, kept in the parent
        wait_until(lambda: b.assigned == {0, 1} - a.assigned, 30, "b to hold the other partition")
        time.sleep(0.5)
        b.stop_event.set()
        thread_b.join(10)
        b.close()
    finally:
        a.stop_event.set()
        thread_a.join(10)
        a.close()
        drain_a.stop.set()
        drain_b.stop.set()
    assert a.error is None and b.error is None
    events = [e for e in log if isinstance(e, tuple)]
    assert events[:3] == [("assign", (0, 1)), ("revoke", (0, 1)), events[2]]
    assert events[2][0] == "assign" and len(events[2][1]) == 1
    mine = events[2][1][0]
    revoke, second = log.index(("revoke", (0, 1))), log.index(events[2])
    first = [(r.partition, r.offset) for r in log[:revoke] if isinstance(r, Record)]
    assert sorted(first) == [(p, o) for p in (0, 1) for o in range(50, 100)]  # seeks applied, nothing twice
    assert revoke + 1 == second  # nothing between the revoke and the next assignment
    again = [(r.partition, r.offset) for r in log[second:] if isinstance(r, Record)]
    assert sorted(again) == [(mine, o) for o in range(50, 100)]


@pytest.mark.parametrize("in_subprocess", [True, False], ids=["subprocess-fetch", "in-process-fetch"])
def test_daemon_learns_every_sample_through_the_fetcher(
    broker: EmbeddedBroker, topic: str, tmp_path: Path, in_subprocess: bool
) -> None:
    """The daemon with either kafka.fetch_in_subprocess: every sample learned once, a learner dead
    letter with the original bytes, offsets committed at stop."""
    stream = load_stream("split-digits", seed=0)
    n = produce_stream(broker.bootstrap_servers, topic, stream)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    wrong = msgpack.packb({"x": [0.0] * 3, "y": 1})
    producer.send(topic, wrong, key=b"split-digits")  # wrong length: dead-lettered by the learner
    producer.flush()
    producer.close()
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            f"kafka.fetch_in_subprocess={str(in_subprocess).lower()}",
            "serve.enabled=false",
            "metrics.enabled=false",
            "model.hidden=[32]",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path}",
        ],
        env={},
    )
    daemon = Daemon(config)
    assert isinstance(daemon.source, ProcessSource) == in_subprocess
    daemon.start()
    try:
        wait_until(
            lambda: daemon.learner.stats()["learned"] >= n and daemon.learner.offsets.get(0) == n + 1,
            120,
            "learning",
        )
        time.sleep(0.5)
    finally:
        daemon.stop()
    assert daemon.failed is None
    assert daemon.learner.stats()["learned"] == n
    assert daemon.metrics.sample_value("stream_cl_samples_total", {"outcome": "invalid"}) == 1
    assert daemon.source._committed == {0: n + 1}
    check = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers, group_id=config.kafka.group_id, enable_auto_commit=False
    )
    try:
        assert check.committed(TopicPartition(topic, 0)) == n + 1  # on the broker, not only in our books
    finally:
        check.close()
    dead = consume_all(broker.bootstrap_servers, f"{topic}.dlq")
    assert [dict(r.headers)["stream_cl.reason"] for r in dead] == [b"bad_length"]
    assert dead[0].value == wrong  # the original bytes, out of the frame the fetcher sent


def test_recv_frame_reads_what_send_bytes_sent_and_stops_at_eof() -> None:
    """The parent's direct read (no BytesIO) speaks `Connection.send_bytes`' format: messages of
    any size in order, the 8-byte length form, a read-only buffer, EOF at a closed or cut peer."""
    import socket
    import struct
    from multiprocessing.connection import Connection

    from stream_cl.ingest.fetcher import recv_frame

    a, b = socket.socketpair()
    reader, writer = Connection(a.detach()), Connection(b.detach())
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # > socket buffer
    received: list[bytes] = []
    thread = threading.Thread(target=lambda: received.extend(bytes(recv_frame(reader)) for _ in range(3)))
    thread.start()
    writer.send_bytes(b"first")
    writer.send_bytes(big)
    writer.send_bytes(b"")
    thread.join(10)
    assert received == [b"first", big, b""]
    # the form Connection uses past 2 GiB: -1, then the length in 8 bytes
    writer._send(struct.pack("!i", -1) + struct.pack("!Q", 3) + b"xyz")  # type: ignore[attr-defined]
    frame = recv_frame(reader)
    assert bytes(frame) == b"xyz" and frame.readonly
    writer._send(struct.pack("!i", 10) + b"cut")  # type: ignore[attr-defined]
    writer.close()
    with pytest.raises(EOFError):
        recv_frame(reader)
    reader.close()


def test_a_fetcher_whose_parent_died_exits_quietly(
    broker: EmbeddedBroker, topic: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of the daemon: its fetcher process sees its end of the socket close, leaves the
    group and exits 0, with no traceback on its stderr."""
    produce_stream(broker.bootstrap_servers, topic, load_stream("split-digits", seed=0), limit=50)
    source, out = _source(broker.bootstrap_servers, topic)
    source.connect()
    child = source._proc
    assert child is not None
    wait_until(lambda: source._conn.poll(0.1), 60, "the first frame from the fetcher")
    source._conn.close()  # what the child sees when its parent is killed: the socket's end closes
    assert child.wait(timeout=30) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "EOFError" not in err, err
    assert "fetcher_parent_gone" in err


@pytest.mark.parametrize("kind", [ProcessSource, KafkaSource], ids=["subprocess", "in_process"])
def test_a_takeover_commits_the_resume_positions_before_any_new_record(
    broker: EmbeddedBroker, topic: str, kind: type[KafkaSource]
) -> None:
    """Partitions taken over resume where the models' manifests say: that position is committed at
    once, so Kafka's own lag tools agree with the daemon before new data arrives."""
    produce_stream(broker.bootstrap_servers, topic, load_stream("split-digits", seed=0), limit=20)
    # nothing marks records processed here: only the takeover can move the committed offset
    source, _ = _source(
        broker.bootstrap_servers, topic, kind, on_assign=lambda parts: dict.fromkeys(parts, 7)
    )
    source.connect()
    thread = threading.Thread(target=source.run, daemon=True)
    thread.start()
    watcher = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers, group_id=f"g-{topic}", enable_auto_commit=False
    )
    try:
        tp = TopicPartition(topic, 0)
        wait_until(lambda: watcher.committed(tp) == 7, 60, "the resume position committed")
    finally:
        watcher.close()
        source.stop_event.set()
        thread.join(30)
        source.close()
