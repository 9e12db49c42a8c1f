"""The OIP v2 HTTP front request by request, on a stub model (test_serve.make_snapshot): per-key
model names, the limits it shares with the socket (rate, connections, body size), sharing the
socket's batcher, and hypothesis fuzzing of the request decoder and of the live handlers."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import INPUT, LABELS, make_snapshot, samples

from stream_cl.config import ServeConfig
from stream_cl.serve.client import PredictionClient
from stream_cl.serve.oip import HttpError, infer_reply, parse_infer
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.server import PredictionServer
from stream_cl.serve.snapshot import SnapshotHolder

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INFER = "/v2/models/stream_cl/infer"


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def body(xs: np.ndarray, **extra: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(xs.shape), "data": xs.ravel().tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


@pytest.fixture
def server() -> Iterator[PredictionServer]:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with PredictionServer(ServeConfig(port=0, http_port=0), holder) as running:
        yield running


def test_per_key_models_are_named_by_their_keys() -> None:
    """With models.per_key each key is a model; an unknown key is a 404, a known one its own model."""
    registry = SnapshotRegistry(keyed=True)
    registry.publish("site-a", make_snapshot(version=3, seed=1))
    registry.publish("site-b", make_snapshot(version=5, seed=2))
    with PredictionServer(ServeConfig(port=0, http_port=0), registry) as server:
        port = server.http_port
        assert port is not None
        xs = samples(4)
        for key, version in (("site-a", 3), ("site-b", 5)):
            status, _, raw = request(port, "POST", f"/v2/models/{key}/infer", body(xs))
            reply = json.loads(raw)
            assert status == 200 and reply["model_name"] == key and reply["model_version"] == str(version)
            want = registry.get(key).predict(xs).proba  # type: ignore[union-attr]
            np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], want.shape), want, rtol=1e-6)
            meta = json.loads(request(port, "GET", f"/v2/models/{key}")[2])
            assert meta["versions"] == [str(version)]
        assert request(port, "POST", "/v2/models/stream_cl/infer", body(xs))[0] == 404
        assert request(port, "GET", "/v2/models/site-c/ready")[0] == 404


def test_rate_limit_answers_429_and_the_connection_stays_usable() -> None:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with PredictionServer(ServeConfig(port=0, http_port=0, max_requests_per_s=2), holder) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port or 0, timeout=10)
        statuses = []
        for _ in range(5):
            conn.request("POST", INFER, body=body(samples(1)))
            r = conn.getresponse()
            statuses.append(r.status)
            r.read()
        conn.close()
        assert statuses[:2] == [200, 200] and 429 in statuses
        assert server.rate_limited >= 1


def test_connections_over_the_limit_get_503() -> None:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with PredictionServer(ServeConfig(port=0, http_port=0, max_connections=2), holder) as server:
        port = server.http_port or 0
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
        for conn in held:  # keep-alive: each stays open after its reply
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
        status, _, raw = request(port, "GET", "/v2/health/live")
        assert status == 503 and "max_connections" in json.loads(raw)["error"]
        for conn in held:
            conn.close()


def test_body_over_the_frame_limit_is_413_before_it_is_read(server: PredictionServer) -> None:
    port = server.http_port or 0
    limit = server.config.max_frame_bytes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n"
        sock.sendall(head.encode())  # the body never comes: the answer must not wait for it
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413") and "max_frame_bytes" in reply


def test_http_and_socket_share_the_batcher(server: PredictionServer) -> None:
    """Concurrent requests on both fronts are answered, from the same snapshot version."""
    errors: list[BaseException] = []
    versions: set[str] = set()

    def over_http() -> None:
        try:
            for _ in range(20):
                status, _, raw = request(server.http_port or 0, "POST", INFER, body(samples(3)))
                assert status == 200
                versions.add(json.loads(raw)["model_version"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=over_http) for _ in range(3)]
    for t in threads:
        t.start()
    with PredictionClient("127.0.0.1", server.port or 0) as client:
        for _ in range(20):
            assert client.predict_batch(samples(2))["model_version"] == 1
    for t in threads:
        t.join(30)
    assert not errors and versions == {"1"}


def test_binary_reply_layout() -> None:
    """Triton's layout: JSON header, then each binary output in order; BYTES as uint32 LE length + bytes."""
    parsed = parse_infer(body(samples(2)), None, INPUT, 8)
    parsed.outputs = {"label": True, "probabilities": True}
    proba = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    out, n = infer_reply("m", 4, parsed, proba, ["two", 1])
    assert n is not None
    header = json.loads(out[:n])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [4 + 3 + 4 + 1, 4 * 4]
    rest = out[n:]
    assert rest[:12] == struct.pack("<I", 3) + b"two" + struct.pack("<I", 1) + b"1"
    assert np.frombuffer(rest[12:], "<f4").tolist() == proba.ravel().tolist()


# -- fuzzing --------------------------------------------------------------------------------------
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "y"]) | values,
        "datatype": st.sampled_from(["FP32", "FP64", "BYTES"]) | values,
        "shape": st.lists(st.integers(-1, 10), max_size=4) | values,
        "data": st.lists(st.floats(width=32) | st.integers(-5, 5), max_size=3 * INPUT) | values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 100) | values}),
    },
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=5) | values,
        "inputs": st.lists(tensor, max_size=2) | values,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["label", "probabilities", "z"])}))
        | values,
        "parameters": st.dictionaries(st.sampled_from(["task", "binary_data_output"]), values, max_size=2),
    },
)


@FUZZ
@given(
    request=requests,
    tail=st.binary(max_size=64),
    header=st.none() | st.integers(-5, 2000) | st.text(max_size=5),
)
def test_fuzz_parse_infer(request: dict[str, Any], tail: bytes, header: Any) -> None:
    """Any request body decodes to [n, INPUT] finite float32 rows or raises a 400 HttpError, nothing else."""
    raw = json.dumps(request).encode()
    header_length = str(len(raw)) if header is None and tail else None if header is None else str(header)
    try:
        parsed = parse_infer(raw + tail, header_length, INPUT, 8)
    except HttpError as e:
        assert e.status == 400 and e.message
        return
    assert parsed.xs.dtype == np.float32 and parsed.xs.shape[1] == INPUT and 1 <= len(parsed.xs) <= 8
    assert np.isfinite(parsed.xs).all() and set(parsed.outputs) <= {"label", "probabilities"}


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[PredictionServer]:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with PredictionServer(ServeConfig(port=0, http_port=0, max_frame_bytes=4096), holder) as running:
        yield running


@FUZZ
@given(
    path=st.sampled_from(
        [INFER, "/v2/models/stream_cl/versions/1/infer", "/v2/models/x/infer", "/v2", "/v2/models/stream_cl"]
    ),
    raw=st.binary(max_size=300) | requests.map(lambda r: json.dumps(r).encode()),
    header=st.none() | st.text(alphabet="0123456789-x", max_size=5),
)
def test_fuzz_http_handlers(fuzzed: PredictionServer, path: str, raw: bytes, header: str | None) -> None:
    """Whatever is POSTed, the answer is a documented status with a JSON body; the server serves on."""
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    status, _, reply = request(fuzzed.http_port or 0, "POST", path, raw, headers)
    assert status in (200, 400, 404, 405, 413), (status, reply)
    decoded = json.loads(reply) if status != 200 or b"binary_data_size" not in reply else None
    if status != 200 and decoded is not None:
        assert isinstance(decoded["error"], str)
    assert request(fuzzed.http_port or 0, "GET", "/v2/health/ready")[0] == 200


def test_labels_are_strings_in_bytes_tensors(server: PredictionServer) -> None:
    status, _, raw = request(server.http_port or 0, "POST", INFER, body(samples(5)))
    labels = {o["name"]: o for o in json.loads(raw)["outputs"]}["label"]["data"]
    assert status == 200 and set(labels) <= {str(label) for label in LABELS}


def test_a_body_that_stalls_gets_408() -> None:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    with (
        PredictionServer(ServeConfig(port=0, http_port=0, read_timeout_s=0.5), holder) as server,
        socket.create_connection(("127.0.0.1", server.http_port or 0), timeout=10) as sock,
    ):
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        reply = sock.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "read_timeout_s" in reply
        assert request(server.http_port or 0, "GET", "/v2/health/ready")[0] == 200


def test_gzip_bodies_are_decompressed_and_still_limited(server: PredictionServer) -> None:
    import gzip

    xs = samples(2)
    status, _, _ = request(
        server.http_port or 0, "POST", INFER, gzip.compress(body(xs)), {"Content-Encoding": "gzip"}
    )
    assert status == 200
    bomb = gzip.compress(b" " * (server.config.max_frame_bytes + 10))
    status, _, raw = request(server.http_port or 0, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413, raw


def test_latency_bench_measures_http_next_to_the_socket() -> None:
    """One run: in-process, socket, HTTP JSON and binary on the same server; every figure present."""
    from stream_cl.bench.latency import format_latency_table, overhead_parts, run_latency_bench

    result = run_latency_bench(
        make_snapshot(), samples(16), n_requests=20, concurrency=(1, 4), duration_s=0.2
    )
    for encoding in ("json", "binary"):
        figures = result["http"][encoding]
        assert figures["p50_ms"] > 0 and set(figures["throughput_rps"]) == {"1", "4"}
        assert figures["p50_vs_socket"] > 0
    assert "http_binary_p50_within_1.5x_socket" in result["goals"]
    assert "HTTP binary infer p50" in format_latency_table(result)
    # the same round trip to a model that answers at once, and to one that busy-waits as long as
    # the forward, are timed beside it; with the forward's own cost they add up to the server's
    assert result["socket_noop_model_p50_ms"] > 0 and result["inprocess_after_round_trip_p50_ms"] > 0
    assert result["waiting_model_busy_ms"] > 0
    assert result["socket_waiting_model_p50_ms"] > result["waiting_model_busy_ms"]
    parts = overhead_parts(result)
    assert sum(parts.values()) == pytest.approx(result["socket_p50_ms"] - result["inprocess_p50_ms"])
    table = format_latency_table(result)
    assert "model that answers at once" in table and "waking after a wait as long as the forward" in table


def test_stalled_headers_get_408_and_silent_connections_close() -> None:
    """Headers trickled past serve.read_timeout_s: 408 and closed; a connection that never sends
    anything closes after serve.idle_timeout_s; neither holds a connection slot for longer."""
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    config = ServeConfig(port=0, http_port=0, read_timeout_s=0.5, idle_timeout_s=1.0, max_connections=2)
    with PredictionServer(config, holder) as server:
        port = server.http_port or 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never finished
            reply = slow.recv(4096).decode()
            assert reply.startswith("HTTP/1.1 408") and "read_timeout_s" in reply
            assert slow.recv(4096) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(4096) == b""  # closed by the server, without a reply
            assert 0.5 < time.monotonic() - started < 5
        assert request(port, "GET", "/v2/health/live")[0] == 200


def test_an_idle_keep_alive_http_client_counts_as_one_that_could_send(server: PredictionServer) -> None:
    """As for the socket, the batcher may wait for companions while an HTTP client is between requests."""

    def settles(expected: bool) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if server.anyone_could_send() == expected:
                return True
            time.sleep(0.02)
        return False

    assert settles(False)  # nobody connected
    assert server.http_port is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.request("GET", "/v2/health/live")
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 200
        assert settles(True)  # the keep-alive connection is open and owes nothing
    finally:
        conn.close()
    assert settles(False)


def test_latency_bench_times_the_plain_backbone_beside_the_strategy() -> None:
    """The configured backbone with a plain head is timed in-process next to the served strategy's
    forward, so the strategy's own cost of prediction is a ratio of one run."""
    from stream_cl.bench.latency import format_latency_table, run_latency_bench
    from stream_cl.bench.latency_cmd import plain_snapshot
    from stream_cl.config import load_config

    served = make_snapshot()
    plain = plain_snapshot(load_config(None, ["model.hidden=[8]"], env={}), served)
    assert plain.labels == served.labels and plain.predict(samples(2)).proba.shape == (2, len(served.labels))
    result = run_latency_bench(
        served, samples(16), n_requests=20, concurrency=(1, 2), duration_s=0.1, plain=plain
    )
    assert result["plain_forward_p50_ms"] > 0
    assert "in-process p50 / plain backbone p50" in format_latency_table(result)
