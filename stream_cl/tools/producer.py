"""Replay samples into a Kafka topic: a built-in benchmark stream or a file of samples.

Files hold samples in the wire format's fields (docs/sample-format.md):
- `.jsonl`: one JSON map per line, `x` as a number array;
- `.msgpack`: a concatenation of msgpack maps (what `write_stream_file` writes, `x` as float32 bin).

A `.msgpack` record is sent byte for byte; a `.jsonl` line is re-encoded as msgpack (a line that is
not JSON goes as its raw bytes). An invalid record is still sent, since the daemon is the
component that judges samples (it dead-letters them), but it is counted and reported here so a user
replaying a broken file learns it before reading the dead-letter topic.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from stream_cl.ingest.codec import InvalidSample, decode_sample, encode_sample
from stream_cl.log import get_logger
from stream_cl.tools.datasets import BenchmarkStream

log = get_logger("stream_cl.tools.producer")

Progress = Callable[[int, int], None]  # (sent, total)
OnInvalid = Callable[[int, str], None]  # (record number from 0, reason)

# Throughput settings: kafka-python spends its time per message in Python, so large batches and a
# short linger keep the sender thread busy with few requests; acks=1 is enough for a replay tool.
PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": 1,
    "enable_idempotence": False,  # idempotence needs acks=all; say so instead of a warning per producer
    "compression_type": None,
    "linger_ms": 5,
    "batch_size": 1 << 20,
    "max_request_size": 16 << 20,
}
_PROGRESS_EVERY = 1000
_LOGGED_INVALID = 5


class ProduceError(RuntimeError):
    """Some messages were not acknowledged by the broker."""


def produce_stream(
    bootstrap_servers: str,
    topic: str,
    stream: BenchmarkStream,
    limit: int | None = None,
    rate: float | None = None,
    binary: bool = True,
    progress: Progress | None = None,
    key: bytes | str | None = None,
) -> int:
    """Send a built-in stream's training samples in stream order; return how many were sent.

    Each message carries `x`, `shape`, `y`, `id` (the sample index) and `task` when the stream
    sends it. `rate` caps samples per second (None = as fast as possible). `key` goes on every
    message; it defaults to the stream's name, so the whole stream lands on one partition and keeps
    its order (Kafka orders only within a partition; unkeyed messages are spread across them).
    """
    total = stream.n_train if limit is None else min(limit, stream.n_train)
    payloads = _stream_payloads(stream, total, binary)
    return _produce(
        bootstrap_servers, topic, payloads, total, rate, progress, stream.name if key is None else key
    )


def produce_file(
    bootstrap_servers: str,
    topic: str,
    path: str | os.PathLike[str],
    limit: int | None = None,
    rate: float | None = None,
    progress: Progress | None = None,
    key: bytes | str | None = None,
    on_invalid: OnInvalid | None = None,
) -> int:
    """Replay a `.jsonl` or `.msgpack` sample file; return how many messages were sent.

    Invalid records are sent too and reported: to `on_invalid(record_number, reason)` when given,
    as warnings for the first few, and as a count in the `file_replayed` log event. A `.msgpack`
    file whose bytes cannot be split into records raises ValueError before anything is sent.
    """
    path = Path(path)
    total, records = _file_records(path)
    total = total if limit is None else min(limit, total)
    invalid = 0

    def check(records: Iterable[tuple[bytes, str | None]]) -> Iterator[bytes]:
        nonlocal invalid
        for number, (payload, reason) in enumerate(records):
            if limit is not None and number >= limit:
                return
            if reason is None:
                try:
                    decode_sample(payload)
                except InvalidSample as e:
                    reason = e.reason
            if reason is not None:
                invalid += 1
                if on_invalid is not None:
                    on_invalid(number, reason)
                if invalid <= _LOGGED_INVALID:
                    log.warning("file_record_invalid", path=str(path), record=number, reason=reason)
            yield payload

    sent = _produce(bootstrap_servers, topic, check(records), total, rate, progress, key)
    log.info("file_replayed", path=str(path), topic=topic, sent=sent, invalid=invalid)
    return sent


def write_stream_file(stream: BenchmarkStream, path: str | os.PathLike[str], limit: int | None = None) -> int:
    """Export a built-in stream to `.jsonl` or `.msgpack` (the formats `produce_file` reads); return the count."""
    path = Path(path)
    total = stream.n_train if limit is None else min(limit, stream.n_train)
    suffix = _file_format(path)
    with path.open("wb") as f:
        if suffix == ".msgpack":
            for payload in _stream_payloads(stream, total, binary=True):
                f.write(payload)
        else:
            # Through the codec and back, so the JSON carries exactly the fields a message would.
            for payload in _stream_payloads(stream, total, binary=False):
                f.write(json.dumps(msgpack.unpackb(payload), separators=(",", ":")).encode() + b"\n")
    return total


def consume_all(bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> list[Any]:
    """Read every message of `topic` from the beginning until caught up; no consumer group.

    Returns kafka-python `ConsumerRecord`s, partition by partition. An unknown topic gives [].
    Raises TimeoutError if it has not caught up within `timeout_s`.

    "Caught up" is judged by the high watermark that fetch responses carry, not by `end_offsets`:
    Tansu 0.6 answers ListOffsets(latest) with the last *batch's* base offset + 1, which falls
    short of the real end whenever the last batch holds more than one record.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=5000,
        fetch_max_bytes=50 << 20,
        max_partition_fetch_bytes=10 << 20,
        fetch_max_wait_ms=100,  # an empty partition answers after this; keeps empty reads quick
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        by_partition: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}

        def caught_up(tp: TopicPartition) -> bool:
            highwater = consumer.highwater(tp)  # None until the first fetch response
            return highwater is not None and consumer.position(tp) >= highwater

        while not all(caught_up(tp) for tp in tps):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = sum(len(v) for v in by_partition.values())
                raise TimeoutError(f"read {got} messages of {topic!r} but not caught up in {timeout_s} s")
            for tp, records in consumer.poll(timeout_ms=int(min(remaining, 0.5) * 1000)).items():
                by_partition[tp].extend(records)
        return [r for tp in tps for r in by_partition[tp]]
    finally:
        consumer.close()


def _stream_payloads(stream: BenchmarkStream, total: int, binary: bool) -> Iterator[bytes]:
    for x, y, task, index in stream.iter_samples():
        if index >= total:
            return
        yield encode_sample(x, y=y, task=task, id=index, shape=stream.input_shape, binary=binary)


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".msgpack"):
        raise ValueError(f"{path}: unknown sample file format {suffix!r}; expected .jsonl or .msgpack")
    return suffix


def _file_records(path: Path) -> tuple[int, Iterator[tuple[bytes, str | None]]]:
    """Count a file's records, then yield each as `(payload, reason)`; reason None = not yet judged.

    Counting first gives `progress` a total and, for `.msgpack`, checks the framing before anything
    is sent: past a corrupt byte the record boundaries are lost, so such a file is refused whole.
    """
    if _file_format(path) == ".jsonl":
        with path.open("rb") as f:
            count = sum(1 for line in f if line.strip())
        return count, _jsonl_records(path)
    ends = _msgpack_record_ends(path)
    truncated = (ends[-1] if ends else 0) < path.stat().st_size
    return len(ends) + truncated, _msgpack_records(path, ends)


def _jsonl_records(path: Path) -> Iterator[tuple[bytes, str | None]]:
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                # Sent as the raw line: the daemon dead-letters it as not msgpack.
                yield line.rstrip(b"\r\n"), "not_json"
                continue
            yield msgpack.packb(obj, use_bin_type=True), None


def _msgpack_record_ends(path: Path) -> list[int]:
    """The byte offset where each complete record ends (skip() walks the framing without decoding)."""
    ends: list[int] = []
    with path.open("rb") as f:
        unpacker = msgpack.Unpacker(f)
        try:
            while True:
                unpacker.skip()
                ends.append(unpacker.tell())
        except msgpack.OutOfData:
            pass
        except ValueError as e:  # FormatError, StackError
            raise ValueError(f"{path}: corrupt msgpack after byte {ends[-1] if ends else 0}: {e}") from e
    return ends


def _msgpack_records(path: Path, ends: list[int]) -> Iterator[tuple[bytes, str | None]]:
    """Each record's original bytes, untouched; a truncated last record is sent like any other."""
    with path.open("rb") as f:
        start = 0
        for end in ends:
            yield f.read(end - start), None
            start = end
        tail = f.read()
        if tail:
            yield tail, "truncated"


def _produce(
    bootstrap_servers: str,
    topic: str,
    payloads: Iterable[bytes],
    total: int,
    rate: float | None,
    progress: Progress | None,
    key: bytes | str | None,
) -> int:
    from kafka import KafkaProducer

    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 samples/s, got {rate}")
    key_bytes = key.encode() if isinstance(key, str) else key
    failures: list[BaseException] = []
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **PRODUCER_SETTINGS)
    sent = 0
    started = time.monotonic()
    try:
        for payload in payloads:
            if rate is not None:
                # Pace against the start time, not the previous send, so sleeps don't accumulate drift.
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.send(topic, value=payload, key=key_bytes).add_errback(failures.append)
            sent += 1
            if progress is not None and sent % _PROGRESS_EVERY == 0:
                progress(sent, total)
        producer.flush()
    finally:
        producer.close()
    if progress is not None:
        progress(sent, total)
    if failures:
        raise ProduceError(f"{len(failures)} of {sent} messages to {topic!r} failed; first: {failures[0]!r}")
    elapsed = time.monotonic() - started
    log.info("produced", topic=topic, sent=sent, seconds=round(elapsed, 3))
    return sent
