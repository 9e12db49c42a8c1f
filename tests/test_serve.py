"""The prediction socket, end to end: a real PredictionServer on a free port, real sockets, and a
small real torch model wrapped in a Snapshot."""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cl.config import ServeConfig
from stream_cl.metrics import Metrics
from stream_cl.serve import batcher
from stream_cl.serve.client import PredictionClient, PredictionError
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.server import MAX_IN_FLIGHT_PER_CONNECTION, PredictionServer
from stream_cl.serve.snapshot import Predictor, Snapshot, SnapshotHolder
from stream_cl.types import TaskId

INPUT = 6
LABELS = (0, 1, "two")
TASKS = ("a", "b")
HEADER = struct.Struct(">I")


def make_snapshot(version: int = 1, seed: int = 0, predictor: Predictor | None = None) -> Snapshot:
    """A tiny MLP; task "b" adds a bias towards label "two", so task routing is observable."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(INPUT, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    bias = {"a": torch.zeros(3), "b": torch.tensor([0.0, 0.0, 2.0])}

    def predict(x: torch.Tensor, task: TaskId | None) -> tuple[torch.Tensor, list[TaskId | None]]:
        route = "a" if task is None else str(task)
        return torch.softmax(net(x) + bias[route], dim=1), [route] * len(x)

    return Snapshot(
        version=version,
        strategy="test",
        labels=LABELS,
        tasks=TASKS,
        input_shape=(INPUT,),
        predictor=predictor or predict,
    )


def samples(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, INPUT)).astype(np.float32)


def assert_matches(
    result: dict[str, Any], snapshot: Snapshot, x: np.ndarray, task: TaskId | None = None
) -> None:
    expected = snapshot.predict(x[None, :], task)
    proba = [result["proba"][label] for label in LABELS]
    np.testing.assert_allclose(proba, expected.proba[0], rtol=1e-6, atol=1e-7)
    assert result["label"] == LABELS[int(expected.proba[0].argmax())]
    assert result["task"] == expected.tasks[0]


def frame(message: Any) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload)) + payload)


def send_msg(sock: socket.socket, message: Any) -> None:
    sock.sendall(frame(message))


def read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def recv_msg(sock: socket.socket) -> dict[str, Any] | None:
    """The next reply, or None when the server closed the connection."""
    header = read_exact(sock, HEADER.size)
    if header is None:
        return None
    payload = read_exact(sock, HEADER.unpack(header)[0])
    assert payload is not None, "connection closed mid-reply"
    reply = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    assert isinstance(reply, dict)
    return reply


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


@dataclass
class Running:
    server: PredictionServer
    holder: SnapshotHolder
    metrics: Metrics
    port: int

    def client(self, **kwargs: Any) -> PredictionClient:
        return PredictionClient(port=self.port, timeout=5.0, **kwargs)

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5.0)


@pytest.fixture
def serve() -> Iterator[Callable[..., Running]]:
    """Start servers (port 0) with config overrides; every one is stopped after the test."""
    started: list[PredictionServer] = []

    def start(snapshot: Snapshot | None = None, **overrides: Any) -> Running:
        holder = SnapshotHolder()
        if snapshot is not None:
            holder.publish(snapshot)
        metrics = Metrics()
        server = PredictionServer(ServeConfig(port=0, http_port=0, **overrides), holder, metrics)
        port = server.start()
        started.append(server)
        return Running(server, holder, metrics, port)

    yield start
    for server in started:
        server.stop(drain_timeout=1.0)


def test_predict_matches_the_in_process_forward(serve: Callable[..., Running]) -> None:
    """A socket `predict` returns the label, probabilities and route of `Snapshot.predict`."""
    snapshot = make_snapshot()
    running = serve(snapshot)
    with running.client() as client:
        for x in samples(5):
            reply = client.predict(x)
            assert reply["ok"] is True and reply["model_version"] == 1
            assert_matches(reply, snapshot, x)


def test_predict_batch_matches_the_in_process_forward(serve: Callable[..., Running]) -> None:
    """`predict_batch` answers each sample as the in-process forward does, task hint included."""
    snapshot = make_snapshot()
    running = serve(snapshot)
    xs = samples(7)
    with running.client() as client:
        for task in (None, "b"):
            reply = client.predict_batch(xs, task=task)
            assert reply["model_version"] == 1 and len(reply["results"]) == len(xs)
            for result, x in zip(reply["results"], xs, strict=True):
                assert_matches(result, snapshot, x, task)


def test_bin_and_array_x_give_the_same_answer(serve: Callable[..., Running]) -> None:
    """`x` as little-endian float32 bytes and as a number array are the same request."""
    running = serve(make_snapshot())
    x = samples(1)[0]
    with running.raw() as sock:
        send_msg(sock, {"op": "predict", "id": "bin", "x": x.astype("<f4").tobytes()})
        send_msg(sock, {"op": "predict", "id": "array", "x": x.tolist()})
        as_bin, as_array = recv_msg(sock), recv_msg(sock)
    assert as_bin is not None and as_array is not None
    assert (as_bin["id"], as_array["id"]) == ("bin", "array")
    assert as_bin["proba"] == as_array["proba"]


def test_task_hint_routes_the_prediction(serve: Callable[..., Running]) -> None:
    """A known `task` reaches the predictor and comes back as the reply's `task`."""
    snapshot = make_snapshot()
    running = serve(snapshot)
    x = samples(1)[0]
    with running.client() as client:
        reply = client.predict(x, task="b")
    assert reply["task"] == "b"
    assert_matches(reply, snapshot, x, "b")


def test_pipelined_requests_are_answered_in_order_with_their_ids(serve: Callable[..., Running]) -> None:
    """Many requests sent before reading any reply are all answered, in request order, ids echoed."""
    snapshot = make_snapshot()
    running = serve(snapshot)
    xs = samples(60)
    ops: list[dict[str, Any]] = []
    for i, x in enumerate(xs):
        ops.append({"op": "predict", "id": f"p{i}", "x": x})
        if i % 10 == 0:
            ops.append({"op": "health", "id": i})
            ops.append({"op": "predict_batch", "id": [i, "batch"], "xs": list(xs[i : i + 3])})
    with running.client() as client:
        ids = [client.send(op) for op in ops]
        replies = [client.recv() for _ in ops]
    assert [r["id"] for r in replies] == ids
    for op, reply in zip(ops, replies, strict=True):
        assert reply["ok"] is True
        if op["op"] == "predict":
            assert_matches(reply, snapshot, op["x"])


def test_model_version_follows_the_published_snapshot(serve: Callable[..., Running]) -> None:
    """After a new snapshot is published, replies carry its version and its answers."""
    running = serve(make_snapshot(version=1, seed=0))
    x = samples(1)[0]
    with running.client() as client:
        assert client.predict(x)["model_version"] == 1
        newer = make_snapshot(version=2, seed=7)
        running.holder.publish(newer)
        reply = client.predict(x)
        assert reply["model_version"] == 2
        assert_matches(reply, newer, x)
        assert client.info()["model_version"] == 2


def test_health_is_starting_until_a_snapshot_is_published(serve: Callable[..., Running]) -> None:
    """`health` says "starting" before the first snapshot and "ready" after it."""
    running = serve()
    with running.client() as client:
        assert client.health() == {"id": 0, "ok": True, "status": "starting"}
        running.holder.publish(make_snapshot())
        assert client.health()["status"] == "ready"


def test_predict_and_info_before_any_snapshot_are_not_ready(serve: Callable[..., Running]) -> None:
    """Without a snapshot, `predict`, `predict_batch` and `info` fail with `not_ready`."""
    running = serve()
    with running.client() as client:
        for call in (
            lambda: client.predict(samples(1)[0]),
            lambda: client.predict_batch(samples(2)),
            client.info,
        ):
            with pytest.raises(PredictionError) as error:
                call()
            assert error.value.code == "not_ready"


def test_info_describes_the_served_snapshot(serve: Callable[..., Running]) -> None:
    """`info` returns version, strategy, classes, tasks and input shape of the snapshot."""
    running = serve(make_snapshot(version=3))
    with running.client() as client:
        info = client.info()
    assert info == {
        "id": 0,
        "ok": True,
        "model_version": 3,
        "strategy": "test",
        "classes": [0, 1, "two"],
        "tasks": ["a", "b"],
        "input_shape": [INPUT],
    }


MALFORMED: dict[str, bytes] = {
    "not_msgpack": b"\xc1\xc1\xc1",
    "empty_frame": b"",
    "not_a_map": msgpack.packb([1, 2, 3]),
    "unknown_op": msgpack.packb({"op": "explode", "id": 1}),
    "missing_op": msgpack.packb({"id": 1}),
    "missing_x": msgpack.packb({"op": "predict", "id": 1}),
    "short_x": msgpack.packb({"op": "predict", "id": 1, "x": [0.5] * (INPUT - 1)}),
    "long_bin_x": msgpack.packb({"op": "predict", "id": 1, "x": b"\0" * 4 * (INPUT + 1)}),
    "odd_bin_x": msgpack.packb({"op": "predict", "id": 1, "x": b"\0" * 5}),
    "nan_x": msgpack.packb({"op": "predict", "id": 1, "x": [math.nan] + [0.0] * (INPUT - 1)}),
    "string_x": msgpack.packb({"op": "predict", "id": 1, "x": "123456"}),
    "bool_in_x": msgpack.packb({"op": "predict", "id": 1, "x": [True] * INPUT}),
    "unknown_task": msgpack.packb({"op": "predict", "id": 1, "x": [0.0] * INPUT, "task": "zzz"}),
    "float_task": msgpack.packb({"op": "predict", "id": 1, "x": [0.0] * INPUT, "task": 1.5}),
    "empty_xs": msgpack.packb({"op": "predict_batch", "id": 1, "xs": []}),
    "bad_row_in_xs": msgpack.packb({"op": "predict_batch", "id": 1, "xs": [[0.0] * INPUT, [1.0]]}),
    "auth_without_token": msgpack.packb({"op": "auth", "id": 1}),
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_get_bad_request_and_the_connection_survives(
    serve: Callable[..., Running], payload: bytes
) -> None:
    """Each malformed request is answered `bad_request` and the next request on the connection works."""
    running = serve(make_snapshot())
    with running.raw() as sock:
        send_frame(sock, payload)
        reply = recv_msg(sock)
        assert reply is not None and reply["ok"] is False
        assert reply["error"]["code"] == "bad_request" and reply["error"]["message"]
        send_msg(sock, {"op": "predict", "id": "after", "x": samples(1)[0].tobytes()})
        after = recv_msg(sock)
    assert after is not None and after["ok"] is True and after["id"] == "after"


def test_oversize_frame_gets_too_large_and_the_connection_closes(serve: Callable[..., Running]) -> None:
    """A frame above max_frame_bytes is refused from its header, then the connection is closed."""
    running = serve(make_snapshot(), max_frame_bytes=1024)
    with running.raw() as sock:
        sock.sendall(HEADER.pack(64_000) + b"\0" * 64_000)
        reply = recv_msg(sock)
        assert reply is not None and reply["error"]["code"] == "too_large"
        assert recv_msg(sock) is None
    with running.client() as client:
        assert client.health()["status"] == "ready"


def test_token_gates_every_op_until_auth(serve: Callable[..., Running]) -> None:
    """With serve.token set, ops before a successful auth (or after a wrong one) are `unauthorized`."""
    running = serve(make_snapshot(), token="s3cret")
    x = samples(1)[0].tobytes()
    with running.raw() as sock:
        for request in (
            {"op": "health", "id": 1},
            {"op": "predict", "id": 2, "x": x},
            {"op": "auth", "id": 3, "token": "wrong"},
            {"op": "info", "id": 4},
        ):
            send_msg(sock, request)
            reply = recv_msg(sock)
            assert reply is not None and reply["id"] == request["id"]
            assert reply["error"]["code"] == "unauthorized"
        send_msg(sock, {"op": "auth", "id": 5, "token": "s3cret"})
        assert recv_msg(sock) == {"id": 5, "ok": True}
        send_msg(sock, {"op": "predict", "id": 6, "x": x})
        reply = recv_msg(sock)
        assert reply is not None and reply["ok"] is True
    with running.client(token="s3cret") as client:
        assert client.health()["status"] == "ready"
    with pytest.raises(PredictionError) as error:
        running.client(token="guess")
    assert error.value.code == "unauthorized"


def test_half_frame_then_disconnect_leaves_the_server_serving(serve: Callable[..., Running]) -> None:
    """A client that vanishes mid-frame costs nothing: others are still answered."""
    running = serve(make_snapshot())
    with running.raw() as sock:
        sock.sendall(HEADER.pack(100) + b"\x81\xa2op")
    with running.raw() as sock:
        sock.sendall(b"\0\0")  # half a header
    with running.client() as client:
        assert client.predict(samples(1)[0])["ok"] is True
    wait_until(lambda: not running.server._connections)


def test_trickling_client_is_cut_off_at_read_timeout(serve: Callable[..., Running]) -> None:
    """A frame unfinished read_timeout_s after it began is cut off, however its bytes trickle in."""
    running = serve(make_snapshot(), read_timeout_s=0.3)
    stop = threading.Event()
    sock = running.raw()

    def trickle() -> None:
        try:
            sock.sendall(HEADER.pack(1000))
            while not stop.wait(0.05):
                sock.sendall(b"\0")
        except OSError:  # the server closed the connection: the point of the test
            pass

    trickler = threading.Thread(target=trickle)
    started = time.monotonic()
    trickler.start()
    with running.client() as client:
        assert client.health()["status"] == "ready"
    reply = recv_msg(sock)
    elapsed = time.monotonic() - started
    stop.set()
    trickler.join()
    sock.close()
    assert reply is not None and reply["error"]["code"] == "bad_request"
    assert "read_timeout_s" in reply["error"]["message"]
    assert 0.25 <= elapsed < 3.0


def test_idle_connection_is_closed_after_idle_timeout(serve: Callable[..., Running]) -> None:
    """A connection that sends nothing for idle_timeout_s is closed by the server."""
    running = serve(make_snapshot(), idle_timeout_s=0.2)
    with running.raw() as sock:
        send_msg(sock, {"op": "health", "id": 1})
        assert recv_msg(sock) is not None
        started = time.monotonic()
        assert recv_msg(sock) is None
    assert 0.15 <= time.monotonic() - started < 3.0


def test_connections_beyond_max_connections_are_refused_politely(serve: Callable[..., Running]) -> None:
    """Past max_connections a new connection gets an error frame and is closed; a freed slot is reused."""
    running = serve(make_snapshot(), max_connections=2)
    first, second = running.client(), running.client()
    assert first.health()["ok"] and second.health()["ok"]
    with running.raw() as extra:
        reply = recv_msg(extra)
        assert reply is not None and reply["error"]["code"] == "not_ready"
        assert "max_connections" in reply["error"]["message"]
        assert recv_msg(extra) is None
    assert first.health()["ok"]
    first.close()
    wait_until(lambda: len(running.server._connections) == 1)
    with running.client() as third:
        assert third.health()["status"] == "ready"
    second.close()


def test_concurrent_clients_all_get_their_own_answers(serve: Callable[..., Running]) -> None:
    """16 clients predicting at once each get the answers for their own inputs."""
    snapshot = make_snapshot()
    running = serve(snapshot)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with running.client() as client:
                for x in samples(20, seed=100 + k):
                    assert_matches(client.predict(x), snapshot, x)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def gated_snapshot(version: int, calls: list[tuple[int, TaskId | None]], gate: threading.Event) -> Snapshot:
    """A snapshot whose forward records (batch size, task) and blocks until `gate` opens."""
    inner = make_snapshot(version)

    def predictor(x: torch.Tensor, task: TaskId | None) -> tuple[torch.Tensor, Any]:
        calls.append((len(x), task))
        assert gate.wait(5.0)
        return inner.predictor(x, task)

    return make_snapshot(version, predictor=predictor)


def test_requests_arriving_together_share_one_forward_per_task(serve: Callable[..., Running]) -> None:
    """Requests queued behind a busy worker run as one forward per task hint, on one snapshot."""
    calls: list[tuple[int, TaskId | None]] = []
    gate = threading.Event()
    running = serve(gated_snapshot(1, calls, gate))
    x = samples(1)[0].tobytes()
    blocker = running.raw()
    send_msg(blocker, {"op": "predict", "id": "first", "x": x})
    wait_until(lambda: len(calls) == 1)
    sockets = [running.raw() for _ in range(8)]
    for i, sock in enumerate(sockets):
        send_msg(sock, {"op": "predict", "id": i, "x": x, "task": "a" if i % 2 else "b"})
    wait_until(lambda: running.server.batcher.queued_samples == 8)
    running.holder.publish(gated_snapshot(2, calls, gate))
    gate.set()
    first = recv_msg(blocker)
    replies = [recv_msg(sock) for sock in sockets]
    for sock in [blocker, *sockets]:
        sock.close()
    assert first is not None and first["model_version"] == 1
    assert sorted(calls[1:], key=str) == [(4, "a"), (4, "b")]
    assert [r["id"] for r in replies if r is not None] == list(range(8))
    assert {r["model_version"] for r in replies if r is not None} == {2}


def threaded_snapshot(forwards: list[tuple[str, int]], sleep_s: float = 0.0) -> Snapshot:
    """A snapshot whose forward records (the thread it ran on, batch size)."""
    inner = make_snapshot()

    def predictor(x: torch.Tensor, task: TaskId | None) -> tuple[torch.Tensor, Any]:
        forwards.append((threading.current_thread().name, len(x)))
        time.sleep(sleep_s)
        return inner.predictor(x, task)

    return make_snapshot(predictor=predictor)


def test_a_lone_client_is_predicted_on_the_loop_and_its_pipelined_frames_share_a_forward(
    serve: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connected client and a fast forward: no thread hand-off (the loop predicts), frames sent
    in one write still make one forward; a second client connected sends it back to the worker."""
    monkeypatch.setattr(batcher, "INLINE_FORWARD_MAX_S", 1.0)  # "fast" even on a loaded machine
    forwards: list[tuple[str, int]] = []
    snapshot = threaded_snapshot(forwards)
    running = serve(snapshot)
    xs = samples(6)
    sock = running.raw()
    for i in (0, 1):  # the first forward's time is unknown: the worker
        send_msg(sock, {"op": "predict", "id": i, "x": xs[i].tobytes()})
        assert recv_msg(sock) is not None
    assert forwards == [("stream_cl-predict", 1), ("stream_cl-serve", 1)]
    sock.sendall(b"".join(frame({"op": "predict", "id": i, "x": xs[i].tobytes()}) for i in range(2, 5)))
    replies = [recv_msg(sock) for _ in range(3)]
    assert [r["id"] for r in replies if r is not None] == [2, 3, 4]
    assert forwards[-1] == ("stream_cl-serve", 3)
    with running.client() as other:  # connected and between requests: the worker again
        other.health()  # its connection is admitted
        send_msg(sock, {"op": "predict", "id": 5, "x": xs[5].tobytes()})
        reply = recv_msg(sock)
        assert reply is not None and reply["ok"] is True
        assert forwards[-1] == ("stream_cl-predict", 1)
        assert_matches(other.predict(xs[5]), snapshot, xs[5])
    sock.close()


def test_a_slow_forward_stays_off_the_loop_even_for_a_lone_client(serve: Callable[..., Running]) -> None:
    forwards: list[tuple[str, int]] = []
    running = serve(threaded_snapshot(forwards, sleep_s=0.005))
    with running.client() as client:
        for x in samples(3):
            client.predict(x)
    assert [thread for thread, _ in forwards] == ["stream_cl-predict"] * 3


def test_a_client_that_does_not_read_stops_being_read(serve: Callable[..., Running]) -> None:
    """Past MAX_IN_FLIGHT_PER_CONNECTION owed replies the server stops reading; nothing is lost."""
    calls: list[tuple[int, TaskId | None]] = []
    gate = threading.Event()
    running = serve(gated_snapshot(1, calls, gate))
    n = MAX_IN_FLIGHT_PER_CONNECTION + 500
    x = samples(1)[0].tobytes()
    with running.raw() as sock:
        sock.sendall(b"".join(frame({"op": "predict", "id": i, "x": x}) for i in range(n)))
        wait_until(lambda: running.server.batcher.queued_samples == MAX_IN_FLIGHT_PER_CONNECTION - 1)
        time.sleep(0.05)  # give an unbounded reader the chance to overshoot
        assert running.server.batcher.queued_samples == MAX_IN_FLIGHT_PER_CONNECTION - 1
        gate.set()
        replies = [recv_msg(sock) for _ in range(n)]
    assert [r["id"] for r in replies if r is not None and r["ok"]] == list(range(n))


def test_predictor_failure_is_internal_and_the_server_keeps_serving(serve: Callable[..., Running]) -> None:
    """An exception in the forward answers `internal`; the server keeps answering afterwards."""

    def broken(x: torch.Tensor, task: TaskId | None) -> tuple[torch.Tensor, Any]:
        raise RuntimeError("boom")

    running = serve(make_snapshot(predictor=broken))
    x = samples(1)[0]
    with running.client() as client:
        with pytest.raises(PredictionError) as error:
            client.predict(x)
        assert error.value.code == "internal"
        assert client.health()["status"] == "ready"
        running.holder.publish(make_snapshot(version=2))
        assert client.predict(x)["model_version"] == 2


def test_stop_answers_in_flight_requests_then_closes(serve: Callable[..., Running]) -> None:
    """stop() refuses new connections, still answers requests already read, then closes."""
    calls: list[tuple[int, TaskId | None]] = []
    gate = threading.Event()
    running = serve(gated_snapshot(1, calls, gate))
    with running.raw() as sock:
        send_msg(sock, {"op": "predict", "id": "in-flight", "x": samples(1)[0].tobytes()})
        wait_until(lambda: len(calls) == 1)
        stopper = threading.Thread(target=running.server.stop)
        stopper.start()
        wait_until(lambda: running.server.stopping)
        with running.raw() as late:
            refused = recv_msg(late)
            assert refused is not None and refused["error"]["message"] == "server is stopping"
        gate.set()
        reply = recv_msg(sock)
        assert reply is not None and reply["id"] == "in-flight" and reply["ok"] is True
        assert recv_msg(sock) is None
        stopper.join()
    with pytest.raises(OSError):
        running.raw()


def test_context_manager_binds_a_free_port_and_releases_it() -> None:
    """`with PredictionServer(...)` serves on the port start() chose and closes it on exit."""
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with PredictionServer(ServeConfig(port=0, http_port=0), holder) as server:
        assert server.port
        with PredictionClient(port=server.port) as client:
            assert client.health()["status"] == "ready"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1.0)


def test_metrics_count_predicted_samples_and_request_latency(serve: Callable[..., Running]) -> None:
    """Each answered prediction request adds one latency observation and its samples to the counter."""
    running = serve(make_snapshot())
    with running.client() as client:
        client.predict(samples(1)[0])
        client.predict_batch(samples(3))
        with pytest.raises(PredictionError):
            client.predict([1.0])
    assert running.metrics.sample_value("stream_cl_predictions_total") == 4
    assert running.metrics.sample_value("stream_cl_predict_seconds_count") == 2


def test_client_refuses_a_blocking_call_while_pipelined_replies_are_unread(
    serve: Callable[..., Running],
) -> None:
    """A convenience call would read someone else's reply, so the client refuses it."""
    running = serve(make_snapshot())
    with running.client() as client:
        client.send({"op": "health"})
        with pytest.raises(RuntimeError, match="pipelined"):
            client.health()
        assert client.recv()["status"] == "ready"
        assert client.health()["status"] == "ready"


# -- fuzzing -------------------------------------------------------------------------------------
ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
ids = st.one_of(st.none(), ints, st.text(max_size=8), st.binary(max_size=8))
junk = st.one_of(
    ids,
    st.booleans(),
    st.floats(),
    st.lists(ints, max_size=3),
    st.dictionaries(st.text(max_size=3), ints, max_size=2),
)
features = st.one_of(
    junk,
    st.binary(max_size=4 * (INPUT + 2)),
    st.lists(st.floats(width=32), min_size=INPUT, max_size=INPUT),
    st.lists(st.one_of(st.floats(), ints, st.booleans()), max_size=INPUT + 1),
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "op": st.one_of(st.sampled_from(["predict", "predict_batch", "health", "info", "auth"]), junk),
        "id": ids,
        "x": features,
        "xs": st.one_of(junk, st.lists(features, max_size=4)),
        "task": st.one_of(st.sampled_from([*TASKS, "nope"]), junk),
        "token": junk,
    },
)
frame_payloads = st.lists(
    st.one_of(st.binary(max_size=48), requests.map(lambda r: msgpack.packb(r, use_bin_type=True))),
    max_size=6,
)


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[int]:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with PredictionServer(
        ServeConfig(port=0, http_port=0, max_frame_bytes=4096, read_timeout_s=2.0), holder
    ) as server:
        assert server.port is not None
        yield server.port


@settings(max_examples=200, deadline=None)
@given(payloads=frame_payloads, garbage=st.binary(max_size=64))
def test_fuzzed_frames_never_break_the_server(
    fuzz_target: int, payloads: list[bytes], garbage: bytes
) -> None:
    """Random frames each get one non-internal reply; random bytes leave the server answering."""
    with socket.create_connection(("127.0.0.1", fuzz_target), timeout=5.0) as sock:
        for payload in payloads:
            send_frame(sock, payload)
        send_msg(sock, {"op": "predict", "id": "final", "x": samples(1)[0].tobytes()})
        replies = [recv_msg(sock) for _ in range(len(payloads) + 1)]
    for reply in replies[:-1]:
        assert reply is not None
        assert reply["ok"] is True or reply["error"]["code"] == "bad_request"
    assert replies[-1] is not None and replies[-1]["id"] == "final" and replies[-1]["ok"] is True
    with socket.create_connection(("127.0.0.1", fuzz_target), timeout=5.0) as sock:
        sock.sendall(garbage)
    with PredictionClient(port=fuzz_target, timeout=5.0) as client:
        assert client.health()["status"] == "ready"


# -- one model per key ---------------------------------------------------------------------------
@pytest.fixture
def keyed() -> Iterator[tuple[SnapshotRegistry, PredictionClient]]:
    """A server over a keyed registry holding two models ("site-a" v1, "site-b" v7)."""
    registry = SnapshotRegistry(keyed=True)
    registry.publish("site-a", make_snapshot(version=1, seed=0))
    registry.publish("site-b", make_snapshot(version=7, seed=1))
    server = PredictionServer(ServeConfig(port=0, http_port=0), registry, Metrics())
    port = server.start()
    try:
        with PredictionClient(port=port, timeout=5.0) as client:
            yield registry, client
    finally:
        server.stop(drain_timeout=1.0)


def test_key_routes_each_request_to_its_model(keyed: tuple[SnapshotRegistry, PredictionClient]) -> None:
    """Requests in one batch window for different keys each get their own model's answer."""
    registry, client = keyed
    xs = samples(6)
    ids = [
        client.send({"op": "predict", "x": x, "key": ("site-a", "site-b")[i % 2]}) for i, x in enumerate(xs)
    ]
    for i, (rid, x) in enumerate(zip(ids, xs, strict=True)):
        reply = client.recv()
        key = ("site-a", "site-b")[i % 2]
        snapshot = registry.get(key)
        assert snapshot is not None and reply["id"] == rid and reply["ok"] is True
        assert reply["model_version"] == snapshot.version
        assert_matches(reply, snapshot, x)
    batch = client.predict_batch(xs, key="site-b", task="b")
    snapshot_b = registry.get("site-b")
    assert snapshot_b is not None
    for result, x in zip(batch["results"], xs, strict=True):
        assert_matches(result, snapshot_b, x, task="b")


def test_keyed_server_errors_name_the_key(keyed: tuple[SnapshotRegistry, PredictionClient]) -> None:
    registry, client = keyed
    with pytest.raises(PredictionError) as missing:
        client.predict(samples(1)[0])
    assert missing.value.code == "bad_request" and "'key' is required" in missing.value.message
    with pytest.raises(PredictionError) as unknown:
        client.predict(samples(1)[0], key="site-z")
    assert unknown.value.code == "not_ready" and "site-z" in unknown.value.message
    client.send({"op": "predict", "x": samples(1)[0], "key": 3})
    wrong_type = client.recv()
    assert (
        wrong_type["error"]["code"] == "bad_request"
        and "'key' must be a str" in wrong_type["error"]["message"]
    )
    assert client.info()["keys"] == ["site-a", "site-b"]
    assert client.info(key="site-b")["model_version"] == 7
    assert client.health()["status"] == "ready"
    registry.remove("site-a")  # the model moved to another daemon
    with pytest.raises(PredictionError) as moved:
        client.predict(samples(1)[0], key="site-a")
    assert moved.value.code == "not_ready"


def test_single_model_server_refuses_a_key(serve: Callable[..., Running]) -> None:
    running = serve(make_snapshot())
    with running.client() as client, pytest.raises(PredictionError) as refused:
        client.predict(samples(1)[0], key="site-a")
    assert refused.value.code == "bad_request" and "drop 'key'" in refused.value.message
