"""The embedded broker and the replay tools, against a real Tansu broker."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from kafka import KafkaProducer

from stream_cl.ingest.codec import decode_sample
from stream_cl.tools.broker import BrokerError, EmbeddedBroker
from stream_cl.tools.datasets import BenchmarkStream, load_stream
from stream_cl.tools.producer import consume_all, produce_file, produce_stream, write_stream_file


@pytest.fixture(scope="module")
def digits() -> BenchmarkStream:
    return load_stream("split-digits")


def _send(bootstrap_servers: str, topic: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers)
    try:
        producer.send(topic, value).get(timeout=10)
    finally:
        producer.close()


def _assert_matches_stream(values: list[bytes], stream: BenchmarkStream) -> None:
    expected = list(stream.iter_samples())[: len(values)]
    for value, (x, y, task, index) in zip(values, expected, strict=True):
        sample = decode_sample(value)
        np.testing.assert_array_equal(sample.x, x)
        assert (sample.y, sample.task, sample.id, sample.shape) == (y, task, index, stream.input_shape)


def test_broker_start_roundtrip_restart_stop() -> None:
    """A broker serves messages, restarts on the same port with empty storage, and stops its process."""
    broker = EmbeddedBroker()
    with broker:
        assert broker.is_running() and broker.port > 0
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        broker.create_topic("roundtrip")
        _send(broker.bootstrap_servers, "roundtrip", b"hello")
        assert [r.value for r in consume_all(broker.bootstrap_servers, "roundtrip")] == [b"hello"]

        port = broker.port
        broker.restart()
        assert broker.is_running() and broker.port == port
        assert consume_all(broker.bootstrap_servers, "roundtrip") == []  # memory-only storage
        pid = broker._proc.pid if broker._proc else -1
    assert not broker.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broker.stop()  # a second stop is a no-op


def test_broker_that_died_can_be_started_again() -> None:
    """start() after the broker process died on its own brings up a fresh one on the same port."""
    with EmbeddedBroker() as broker:
        port = broker.port
        assert broker._proc is not None
        broker._proc.kill()
        broker._proc.wait()
        assert not broker.is_running()
        broker.start()
        assert broker.is_running() and broker.port == port
        broker.create_topic("after-crash")


def test_create_topic_is_idempotent(broker: EmbeddedBroker) -> None:
    """Creating an existing topic again neither fails nor empties it."""
    broker.create_topic("idempotent")
    _send(broker.bootstrap_servers, "idempotent", b"kept")
    broker.create_topic("idempotent")
    assert [r.value for r in consume_all(broker.bootstrap_servers, "idempotent")] == [b"kept"]


def test_broker_that_exits_raises_with_its_output() -> None:
    """A broker binary that exits at startup raises BrokerError instead of hanging."""
    with pytest.raises(BrokerError, match="exited with code 1"):
        EmbeddedBroker(binary="false").start()


def test_missing_broker_binary_raises_broker_error(tmp_path: Path) -> None:
    """A broker binary that does not exist raises BrokerError naming it."""
    with pytest.raises(BrokerError, match="no-such-tansu"):
        EmbeddedBroker(binary=str(tmp_path / "no-such-tansu")).start()


def test_consume_all_of_unknown_topic_is_empty(broker: EmbeddedBroker) -> None:
    """consume_all returns [] for a topic that does not exist."""
    assert consume_all(broker.bootstrap_servers, "never-created-topic", timeout_s=5) == []


def test_produce_stream_sends_exactly_the_stream(
    broker: EmbeddedBroker, topic: str, digits: BenchmarkStream
) -> None:
    """produce_stream sends `limit` keyed messages that decode to the stream's x, y, task, id and shape."""
    calls: list[tuple[int, int]] = []
    sent = produce_stream(
        broker.bootstrap_servers, topic, digits, limit=1200, progress=lambda *a: calls.append(a), key="k"
    )
    assert sent == 1200
    assert calls[-1] == (1200, 1200) and (1000, 1200) in calls
    records = consume_all(broker.bootstrap_servers, topic)
    assert len(records) == 1200 and {r.key for r in records} == {b"k"}
    _assert_matches_stream([r.value for r in records], digits)


def test_produce_stream_whole_stream_as_arrays_without_task(broker: EmbeddedBroker, topic: str) -> None:
    """With binary=False and send_task=False the whole stream arrives as number arrays without `task`."""
    stream = load_stream("split-digits", send_task=False)
    assert produce_stream(broker.bootstrap_servers, topic, stream, binary=False) == stream.n_train
    values = [r.value for r in consume_all(broker.bootstrap_servers, topic)]
    assert isinstance(msgpack.unpackb(values[0])["x"], list)
    assert "task" not in msgpack.unpackb(values[-1])
    _assert_matches_stream(values, stream)


def test_produce_stream_respects_rate(broker: EmbeddedBroker, topic: str, digits: BenchmarkStream) -> None:
    """A rate of 200 samples/s spreads 41 samples over at least 0.2 s."""
    started = time.monotonic()
    produce_stream(broker.bootstrap_servers, topic, digits, limit=41, rate=200)
    assert time.monotonic() - started >= 0.2


def test_produce_jsonl_file_counts_invalid_lines(
    broker: EmbeddedBroker, topic: str, digits: BenchmarkStream, tmp_path: Path
) -> None:
    """A .jsonl replay sends every line, valid ones decoding to the stream, and reports the invalid ones."""
    path = tmp_path / "samples.jsonl"
    assert write_stream_file(digits, path, limit=20) == 20
    with path.open("a") as f:
        f.write("{not json\n\n")
        f.write(json.dumps({"y": 1}) + "\n")
    invalid: list[tuple[int, str]] = []
    sent = produce_file(broker.bootstrap_servers, topic, path, on_invalid=lambda *a: invalid.append(a))
    assert sent == 22
    assert invalid == [(20, "not_json"), (21, "missing_x")]
    values = [r.value for r in consume_all(broker.bootstrap_servers, topic)]
    assert values[20] == b"{not json"
    _assert_matches_stream(values[:20], digits)


def test_produce_msgpack_file_sends_records_byte_for_byte(
    broker: EmbeddedBroker, topic: str, digits: BenchmarkStream, tmp_path: Path
) -> None:
    """A .msgpack replay sends each record's bytes unchanged, reporting a non-map and a truncated tail."""
    path = tmp_path / "samples.msgpack"
    write_stream_file(digits, path, limit=30)
    with path.open("ab") as f:
        f.write(msgpack.packb([1, 2]))
        f.write(msgpack.packb({"x": b"\x00" * 8, "y": 1})[:-3])
    invalid: list[tuple[int, str]] = []
    progress: list[tuple[int, int]] = []
    sent = produce_file(
        broker.bootstrap_servers,
        topic,
        path,
        on_invalid=lambda *a: invalid.append(a),
        progress=lambda *a: progress.append(a),
    )
    assert sent == 32 and progress[-1] == (32, 32)
    assert invalid == [(30, "not_a_map"), (31, "truncated")]
    values = [r.value for r in consume_all(broker.bootstrap_servers, topic)]
    assert b"".join(values) == path.read_bytes()
    _assert_matches_stream(values[:30], digits)


def test_produce_file_limit(
    broker: EmbeddedBroker, topic: str, digits: BenchmarkStream, tmp_path: Path
) -> None:
    """produce_file stops after `limit` records."""
    path = tmp_path / "samples.msgpack"
    write_stream_file(digits, path, limit=30)
    assert produce_file(broker.bootstrap_servers, topic, path, limit=7) == 7
    assert len(consume_all(broker.bootstrap_servers, topic)) == 7


def test_corrupt_msgpack_file_is_refused_before_sending(
    broker: EmbeddedBroker, topic: str, tmp_path: Path
) -> None:
    """A .msgpack file whose records can't be delimited raises ValueError and sends nothing."""
    path = tmp_path / "corrupt.msgpack"
    path.write_bytes(msgpack.packb({"x": [1.0]}) + b"\xc1\xc1")
    with pytest.raises(ValueError, match="corrupt msgpack"):
        produce_file(broker.bootstrap_servers, topic, path)
    assert consume_all(broker.bootstrap_servers, topic) == []


def test_unknown_file_format_is_rejected(tmp_path: Path, digits: BenchmarkStream) -> None:
    """Only .jsonl and .msgpack sample files are accepted."""
    with pytest.raises(ValueError, match=r"\.jsonl or \.msgpack"):
        write_stream_file(digits, tmp_path / "samples.csv")
