"""The process-based fetcher (`kafka.fetch_in_subprocess = true`, the default): Kafka fetch + decode off the GIL.

kafka-python parses record batches in pure Python and `decode_sample` validates every message:
together ~30 µs per sample that, on the source thread, hold the GIL the learner thread needs
between its torch ops. `ProcessSource` keeps the `KafkaSource` interface and moves the consumer
into a child process (`python -m stream_cl.ingest.fetcher`: a fresh interpreter, so no torch and no
threads are forked, and the parent's `__main__` is not re-imported):

    child: KafkaSource (consumer + its dead-letter producer) ─ poll, decode, dead-letter invalid
      │  one pipe, in stream order: record batches, rebalance calls, commit results, high watermarks
      ▼
    parent (ProcessSource.run, the source thread): Chunks into the learner queue, metrics

- **Records** cross as one frame per poll (`_records_frame`): a msgpack header with the poll's
  `Chunk` columns, one msgpack array each (`chunk.COLUMNS`: partitions, offsets, keys, dead-letter
  reasons, where each `x` and each original message lie, decoded `y`, `task`, `id`, `ts`,
  `shape`); then every `x` back to back as one aligned float32 block, then every original
  message back to back. The parent hands the learner a `Chunk` over the one received buffer:
  nothing is built or copied per message on the source thread, and no `x` is unaligned (reading
  each `x` out of its message cost a copy, and unpacking the bytes of each message another).
  Messages the child dead-lettered cross too, marked with their reason, so the learner still
  marks them processed in order. The frame is internal to the parent and its child.
- **Rebalances** are calls: inside the child's `poll`, its listener sends `revoke`/`lost`/`assign`
  and waits; the parent runs `_SeekOnAssign` (the in-process listener, hooks included) on its
  own state and answers (for `assign`: the offsets to seek to, which the child applies). Records
  sent before the call are queued for the learner before the hooks run, as in-process.
- **Commits**: the parent owns the processed offsets (`mark_processed`); `commit()` flushes the
  parent's dead-letter producer (the learner's dead letters), then asks the child, which flushes
  its own producer and commits; the result comes back. A failed commit is retried.
- **Errors**: the child retries poll errors itself and reports them (`source_errors_total`); if
  it dies, `run()` ends with `error` set, like a failing in-process source.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

import msgpack
import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream_cl.config import Config, KafkaConfig
from stream_cl.ingest.chunk import Chunk, ChunkBuilder
from stream_cl.ingest.sinks import kafka_producer
from stream_cl.ingest.source import KafkaSource, QueueItem, _SeekOnAssign
from stream_cl.metrics import Metrics

CLOSE_TIMEOUT_S = 15.0
PIPE_BUFFER_BYTES = 4 << 20


def _pack(*message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(blob: bytes | memoryview, use_list: bool = True) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False, use_list=use_list)


RECORDS = b"R"  # first byte of a records frame; every other message is a msgpack array (0x9X/0xdX)
_HEADER_AT = len(RECORDS) + 4  # the header's length (4 bytes LE) comes first


def _block_at(header_size: int) -> int:
    """Where a records frame's x block starts: after the header, at a multiple of 16."""
    end = _HEADER_AT + header_size
    return end + -end % 16


def _records_frame(decoded: ChunkBuilder, high: dict[int, int]) -> bytes:
    """RECORDS, header length (4 bytes LE), msgpack header, padding to 16, x block, raw block."""
    header = _pack("records", decoded.columns(), high, decoded.x_size)
    pad = _block_at(len(header)) - _HEADER_AT - len(header)
    block = decoded.x_block().tobytes()
    return b"".join([RECORDS, len(header).to_bytes(4, "little"), header, bytes(pad), block, *decoded.raws])


def recv_frame(conn: Connection) -> memoryview:
    """The next message `conn.send_bytes` sent, read straight into one new buffer.

    `Connection.recv_bytes` reads through a BytesIO: for the fetcher's frames (up to ~13 MB with
    `kafka.max_poll_records` MNIST samples) that cost ~9 ms of CPU per 6 MB, mostly copies made
    while holding the GIL the learner thread needs; reading into the buffer cost 0.9 ms (both on
    one 2-core machine). Same wire format: a 4-byte big-endian length, or -1 and an 8-byte one.
    The buffer is not zero-filled first: every byte of it is read before it is returned.
    """
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read_exactly(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exactly(fd, 8))
    return _read_exactly(fd, size)


def _read_exactly(fd: int, size: int) -> memoryview:
    view = np.empty(size, dtype=np.uint8).data  # a writable memoryview, not zero-filled
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])  # releases the GIL while the kernel copies
        if n == 0:
            raise EOFError
        got += n
    return view.toreadonly()  # as `recv_bytes`' bytes: the samples' x views stay read-only


def _message(blob: bytes | memoryview) -> list[Any]:
    """A message from the fetcher; a records frame becomes ["records", columns, high, xs, raws]
    with `xs` (float32) and `raws` views into `blob`."""
    if blob[:1] != RECORDS:
        return cast(list[Any], _unpack(blob))
    view = memoryview(blob)
    size = int.from_bytes(view[len(RECORDS) : _HEADER_AT], "little")
    # columns as tuples (each shape a tuple): untracked by the garbage collector once it sees them
    kind, columns, high, n = _unpack(view[_HEADER_AT : _HEADER_AT + size], use_list=False)
    start = _block_at(size)
    xs = np.frombuffer(blob, dtype="<f4", count=n, offset=start)
    return [kind, columns, high, xs, view[start + 4 * n :]]


class _SeekRecorder:
    """Stands in for the consumer while `_SeekOnAssign` runs in the parent: records its seeks."""

    def __init__(self) -> None:
        self.seeks: dict[int, int] = {}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp.partition] = int(offset)


class ProcessSource(KafkaSource):
    """`KafkaSource` whose consumer runs in a child process; same interface, same guarantees."""

    def __init__(
        self,
        config: KafkaConfig,
        out: queue.Queue[QueueItem],
        metrics: Metrics,
        expected_size: Callable[[], int | None] = lambda: None,
        max_features: int = 1 << 20,
        on_revoke: Callable[[list[int], bool], None] | None = None,
        on_assign: Callable[[list[int]], dict[int, int]] | None = None,
        log_level: str = "info",
        log_format: str = "auto",
    ) -> None:
        super().__init__(config, out, metrics, expected_size, max_features, on_revoke, on_assign)
        self._log_settings = (log_level, log_format)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()  # the source thread and close() both send
        self._listener = _SeekOnAssign(self)
        self._expected_sent: int | None = None
        self._highwater: dict[int, int] = {}
        self._commit_pending = False
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The fetcher process's id while it runs (for CPU accounting), else None."""
        return self._proc.pid if self._alive() and self._proc is not None else None

    # -- the child ------------------------------------------------------------------------------
    def connect(self) -> None:
        c = self.config
        parent, child = socket.socketpair()
        for sock in (parent, child):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
        with child:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "stream_cl.ingest.fetcher", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self._conn = Connection(parent.detach())
        self._conn.send((c, self.max_features, self._log_settings))  # pickled: the child's settings
        self._dead_letters = kafka_producer(
            c, durable=True
        )  # the learner's dead letters (bad length, class cap)

    def _send(self, *message: Any) -> None:
        assert self._conn is not None
        with self._send_lock:
            self._conn.send_bytes(_pack(*message))

    # -- the source thread ----------------------------------------------------------------------
    def _connect_once(self) -> None:
        if self._conn is None:
            self.connect()

    def _fetch(self) -> bool:
        """Tell the fetcher the expected sample size; handle one message from it, if one came."""
        conn = self._conn
        assert conn is not None
        expected = self.expected_size()
        if expected != self._expected_sent and expected is not None:
            self._send("expected", expected)
            self._expected_sent = expected
        if conn.poll(0.05):
            try:
                blob = recv_frame(conn)
            except EOFError:
                raise RuntimeError(f"the fetcher process exited (code {self._exit_code()})") from None
            self._handle(_message(blob))
        elif not self._alive():
            raise RuntimeError(f"the fetcher process exited (code {self._exit_code()})")
        return True

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _handle(self, message: list[Any], deliver: bool = True) -> None:
        kind = message[0]
        if kind == "records":
            self._highwater.update({int(p): int(h) for p, h in message[2].items()})
            if message[1][0] and deliver:  # any messages (the partitions column)
                self._put(self._chunk(message[1], message[3], message[4]))
        elif kind in ("revoke", "lost"):
            tps = [TopicPartition(self.config.topic, p) for p in message[1]]
            if kind == "lost":
                self._listener.on_partitions_lost(tps)
            else:
                self._listener.on_partitions_revoked(tps)
            self._send("ack")
        elif kind == "assign":
            tps = [TopicPartition(self.config.topic, p) for p in message[1]]
            recorder = _SeekRecorder()
            self.consumer = cast(KafkaConsumer, recorder)  # the listener seeks through it
            try:
                self._listener.on_partitions_assigned(tps)
            finally:
                self.consumer = None
            self._send("seek", recorder.seeks)
        elif kind == "committed":
            self._commit_pending = False
            self._committed.update({int(p): int(o) for p, o in message[1].items()})
            self.log.debug("offsets_committed", offsets=message[1])
        elif kind == "commit_failed":
            self._commit_pending = False
            self.metrics.source_errors.labels(kind="commit").inc()
            self._commit_now.set()
        elif kind == "error":
            self.metrics.source_errors.labels(kind=message[1]).inc()
        elif kind == "closed":
            self._closed = True

    def _chunk(self, columns: Sequence[Any], xs: np.ndarray, raws: memoryview) -> Chunk:
        """The poll's Chunk over the received blocks; the child's dead letters are counted here."""
        chunk = Chunk.from_columns(columns, xs, raws)
        for reason in chunk.invalid:
            if reason is not None:
                self.dead_lettered += 1
                self.metrics.samples.labels(outcome="invalid").inc()
                self.metrics.dead_letters.labels(reason=reason).inc()
        return chunk

    def commit(self) -> None:
        """Ask the child to commit the processed offsets (after the learner's dead letters are durable)."""
        if self._conn is None or self._commit_pending:
            return
        with self._lock:
            todo = {p: o for p, o in self._processed.items() if self._committed.get(p) != o}
        if not todo:
            return
        if self._dead_letters is not None:
            self._dead_letters.flush(timeout=10)
        self._commit_pending = True
        self._send("commit", todo)

    def _update_lag(self) -> None:
        for partition, high in self._highwater.items():
            with self._lock:
                done = self._processed.get(partition, 0)
            self.metrics.consumer_lag.labels(partition=str(partition)).set(max(0, high - done))

    def close(self) -> None:
        """Final commit, then the child closes its consumer; rebalance calls are answered meanwhile."""
        conn = self._conn
        try:
            if conn is None or not self._alive():
                return
            self._commit_pending = False
            self.commit()
            self._send("close")
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while not self._closed and time.monotonic() < deadline:
                if conn.poll(0.1):
                    try:
                        message = _message(recv_frame(conn))
                    except EOFError:
                        break
                    self._handle(message, deliver=False)  # records now would never be learned
                elif not self._alive():
                    break
        finally:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            if conn is not None:
                conn.close()
            if self._dead_letters is not None:
                self._dead_letters.flush(timeout=10)
                self._dead_letters.close(timeout=5)


# -- the child process -----------------------------------------------------------------------------


def _child_main(fd: int) -> None:
    from stream_cl.log import configure_logging

    conn = Connection(fd)
    try:
        config, max_features, log = conn.recv()
    except EOFError:
        return  # the parent went away before it said anything
    configure_logging(*log)
    _Fetcher(conn, config, max_features).run()


class _Fetcher:
    """The child's loop: poll, decode, send; answer the parent's commit / expected / close."""

    def __init__(self, conn: Connection, config: KafkaConfig, max_features: int) -> None:
        self.conn = conn
        self.config = config
        self.expected: int | None = None
        self.stash: list[list[Any]] = []  # parent messages that arrived during a rebalance call
        self.closing = False
        self.parent_gone = False  # its end of the socket closed: the parent died (kill -9, a crash)
        self.source = KafkaSource(
            config,
            queue.Queue(),
            Metrics(),  # private: the parent counts from what is sent
            expected_size=lambda: self.expected,  # as the parent last said
            max_features=max_features,
            on_revoke=self._revoke,
            on_assign=self._assign,
        )

    def send(self, *message: Any) -> None:
        self.conn.send_bytes(_pack(*message))

    def _call(self, *message: Any) -> list[Any]:
        """A rebalance call: send, then wait for the parent's answer (other messages are stashed:
        committing inside the consumer's callback would wedge it)."""
        self.send(*message)
        while True:
            reply = _unpack(self.conn.recv_bytes())
            if reply[0] in ("ack", "seek"):
                return cast(list[Any], reply)
            self.stash.append(reply)

    def _revoke(self, partitions: list[int], lost: bool) -> None:
        try:
            self._call("lost" if lost else "revoke", partitions)
        except (EOFError, ConnectionError):  # inside the consumer's callback: noted, not raised
            self.parent_gone = True

    def _assign(self, partitions: list[int]) -> dict[int, int]:
        try:
            return {int(p): int(o) for p, o in self._call("assign", partitions)[1].items()}
        except (EOFError, ConnectionError):
            self.parent_gone = True
            return {}

    def _control(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "expected":
            self.expected = int(message[1])
        elif kind == "commit":
            offsets = {int(p): int(o) for p, o in message[1].items()}
            source = self.source
            source._processed.update(offsets)
            source._commit_now.clear()
            source.commit()
            if source._commit_now.is_set():  # KafkaSource.commit flags a failure for a retry
                source._commit_now.clear()
                self.send("commit_failed")
            else:
                self.send("committed", offsets)
        elif kind == "close":
            self.closing = True

    def run(self) -> None:
        source = self.source
        source.connect()
        consumer = source.consumer
        assert consumer is not None
        try:
            try:
                self._loop(consumer)
            except (EOFError, ConnectionError):
                self.parent_gone = True
            if self.parent_gone:
                # Nobody takes records any more. Leave the group at once without committing (the
                # parent committed what it had processed; the rest is re-read by whoever takes
                # the partitions) and exit quietly.
                source.log.info("fetcher_parent_gone")
                with contextlib.suppress(Exception):
                    consumer.close(autocommit=False)
                return
            while self.stash:
                self._control(self.stash.pop(0))
            source.close()  # final commit of what the parent last sent, then leave the group
        finally:
            with contextlib.suppress(OSError):
                self.send("closed")

    def _loop(self, consumer: Any) -> None:
        source = self.source
        backoff = 0.0
        last_high = 0.0
        while not self.closing and not self.parent_gone:
            while self.stash:
                self._control(self.stash.pop(0))
            while not self.closing and self.conn.poll(0):
                self._control(_unpack(self.conn.recv_bytes()))
            if self.closing:
                break
            try:
                polled = consumer.poll(timeout_ms=self.config.poll_timeout_ms)
                backoff = 0.0
            except KafkaError as e:
                backoff = min(5.0, max(0.1, backoff * 2))
                source.log.warning("kafka_poll_failed", error=str(e), retry_in_s=backoff)
                self.send("error", "poll")
                time.sleep(backoff)
                continue
            decoded = source._decode(polled)  # dead-letters invalid messages here
            now = time.monotonic()
            high: dict[int, int] = {}
            if now - last_high >= 1.0:
                last_high = now
                for tp in consumer.assignment():
                    h = consumer.highwater(tp)
                    if h is not None:
                        high[tp.partition] = h
            if len(decoded) or high:
                self.conn.send_bytes(_records_frame(decoded, high))


def make_source(
    config: Config,
    out: queue.Queue[QueueItem],
    metrics: Metrics,
    **hooks: Any,
) -> KafkaSource:
    """The daemon's source: in-process, or with `kafka.fetch_in_subprocess` a `ProcessSource`."""
    if config.kafka.fetch_in_subprocess:
        return ProcessSource(
            config.kafka, out, metrics, log_level=config.log.level, log_format=config.log.format, **hooks
        )
    return KafkaSource(config.kafka, out, metrics, **hooks)


if __name__ == "__main__":  # the child: `python -m stream_cl.ingest.fetcher FD`
    _child_main(int(sys.argv[1]))
