"""The OIP v2 HTTP front end to end: a real daemon on the embedded broker, and a `stream-cl serve
--follow` replica with token and TLS, spoken to by an unmodified tritonclient (binary tensors, its
default) and by plain JSON over urllib. Request-level checks with a stub model: test_http_front.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from support import free_port, kafka_overrides, wait_until
from tritonclient.utils import InferenceServerException

from stream_cl.config import Config, load_config
from stream_cl.runtime.daemon import Daemon
from stream_cl.serve.client import PredictionClient
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import BenchmarkStream, load_stream
from stream_cl.tools.producer import produce_stream

ROOT = Path(__file__).resolve().parents[1]
MODEL = "stream_cl"


def http(
    port: int, path: str, body: Any = None, headers: dict[str, str] | None = None, context: Any = None
) -> tuple[int, Any]:
    """(status, decoded JSON body) of one plain HTTP request; `body` (a dict) is sent as JSON POST."""
    scheme = "https" if context is not None else "http"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def infer_body(xs: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(xs.shape), "data": xs.ravel().tolist()}],
        **extra,
    }


@dataclass
class Served:
    daemon: Daemon
    config: Config
    stream: BenchmarkStream
    snapshot_topic: str
    before: dict[str, int] = field(default_factory=dict)  # status codes seen before the first snapshot

    @property
    def port(self) -> int:
        assert self.daemon.http_port is not None
        return self.daemon.http_port

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(f"127.0.0.1:{self.port}")


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A daemon that learns split-digits and publishes snapshots; what its HTTP front said before."""
    stream = load_stream("split-digits", seed=0)
    topic = f"http-{os.getpid()}-{time.monotonic_ns()}"
    broker.create_topic(topic)
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.port=0",
            "model.hidden=[64]",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path_factory.mktemp('ckpt')}",
            f"publish.topic={topic}.snapshots",
            "publish.interval_s=0.5",
        ],
        env={},
    )
    daemon = Daemon(config)
    daemon.start()
    state = Served(daemon, config, stream, f"{topic}.snapshots")
    try:
        x = stream.tasks[0].test_x[:1].reshape(1, -1)
        for path in (
            "/v2/health/live",
            "/v2/health/ready",
            f"/v2/models/{MODEL}/ready",
            f"/v2/models/{MODEL}",
        ):
            state.before[path] = http(state.port, path)[0]
        state.before["infer"] = http(state.port, f"/v2/models/{MODEL}/infer", infer_body(x))[0]
        produce_stream(broker.bootstrap_servers, topic, stream)
        wait_until(lambda: daemon.learner.stats()["learned"] >= stream.n_train, 120, "every sample learned")
        assert daemon.wait_idle(30)
        yield state
    finally:
        daemon.stop()


def test_live_and_ready_follow_the_first_snapshot(served: Served) -> None:
    """Live from the start; ready (server and model), metadata and infer 503 until a snapshot serves."""
    assert served.before == {
        "/v2/health/live": 200,
        "/v2/health/ready": 503,
        f"/v2/models/{MODEL}/ready": 503,
        f"/v2/models/{MODEL}": 503,
        "infer": 503,
    }
    client = served.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert http(served.port, "/v2/health/ready") == (200, {"ready": True})


def test_metadata(served: Served) -> None:
    """Server metadata names the binary extension; model metadata gives x, probabilities, label, version."""
    client = served.client()
    server = client.get_server_metadata()
    assert server["name"] == "stream_cl" and "binary_tensor_data" in server["extensions"]
    snapshot = served.daemon.holder.get()
    assert snapshot is not None
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == [str(snapshot.version)]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, *snapshot.input_shape]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(snapshot.labels)]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert client.get_model_metadata(MODEL, model_version=str(snapshot.version))["name"] == MODEL
    assert http(served.port, "/v2/models/other")[0] == 404
    assert http(served.port, f"/v2/models/{MODEL}/versions/999999")[0] == 404


def _triton_infer(client: triton.InferenceServerClient, xs: np.ndarray, **kwargs: Any) -> triton.InferResult:
    tensor = triton.InferInput("x", list(xs.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(xs, dtype=np.float32))  # binary_data=True: the default
    return client.infer(MODEL, [tensor], **kwargs)


def test_tritonclient_single_and_batched_inference(served: Served) -> None:
    """Binary tensors both ways; probabilities and labels equal the serving snapshot's own forward."""
    snapshot = served.daemon.holder.get()
    assert snapshot is not None
    xs = served.stream.tasks[0].test_x[:50].reshape(50, *snapshot.input_shape).astype(np.float32)
    client = served.client()
    for batch in (xs[:1], xs):
        result = _triton_infer(client, batch, request_id="req-7")
        response = result.get_response()
        assert response["id"] == "req-7" and response["model_version"] == str(snapshot.version)
        assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
        want = snapshot.predict(batch.reshape(len(batch), -1)).proba
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=1e-5, atol=1e-6)
        labels = [snapshot.labels[i] for i in want.argmax(1)]
        assert result.as_numpy("label").tolist() == [str(label).encode() for label in labels]
    only = client.infer(
        MODEL,
        [_input(xs[:3], binary=False)],
        outputs=[triton.InferRequestedOutput("label", binary_data=False)],
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["label"]
    assert only.as_numpy("probabilities") is None


def _input(xs: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("x", list(xs.shape), "FP32")
    tensor.set_data_from_numpy(xs.astype(np.float32), binary_data=binary)
    return tensor


def test_plain_json_inference(served: Served) -> None:
    """JSON in and out (flat and nested data), outputs as the request names them, id echoed."""
    snapshot = served.daemon.holder.get()
    assert snapshot is not None
    xs = served.stream.tasks[0].test_x[:4].reshape(4, -1).astype(np.float32)
    status, reply = http(served.port, f"/v2/models/{MODEL}/infer", infer_body(xs, id="j1"))
    assert status == 200 and reply["id"] == "j1" and reply["model_name"] == MODEL
    probabilities = {o["name"]: o for o in reply["outputs"]}["probabilities"]
    assert probabilities["shape"] == [4, len(snapshot.labels)]
    want = snapshot.predict(xs).proba
    np.testing.assert_allclose(np.reshape(probabilities["data"], (4, -1)), want, rtol=1e-5, atol=1e-6)
    nested = infer_body(xs, outputs=[{"name": "label"}])
    nested["inputs"][0]["data"] = xs.tolist()
    status, reply = http(served.port, f"/v2/models/{MODEL}/versions/{snapshot.version}/infer", nested)
    assert status == 200 and reply["model_version"] == str(snapshot.version)
    assert reply["outputs"] == [
        {
            "name": "label",
            "datatype": "BYTES",
            "shape": [4],
            "data": [str(snapshot.labels[i]) for i in want.argmax(1)],
        }
    ]


def test_task_hint(served: Served) -> None:
    """parameters.task routes like the socket's task field; an unknown task is a 400."""
    snapshot = served.daemon.holder.get()
    assert snapshot is not None and len(snapshot.tasks) > 1
    xs = served.stream.tasks[1].test_x[:30].reshape(30, -1).astype(np.float32)
    client = served.client()
    assert served.daemon.serve_port is not None
    with PredictionClient("127.0.0.1", served.daemon.serve_port) as sock:
        for task in snapshot.tasks:
            got = _triton_infer(client, xs, parameters={"task": task}).as_numpy("label").tolist()
            want = [str(r["label"]).encode() for r in sock.predict_batch(xs, task=task)["results"]]
            assert got == want
    with pytest.raises(InferenceServerException, match="unknown task"):
        _triton_infer(client, xs, parameters={"task": "no-such-task"})


def test_http_accuracy_equals_the_socket_on_the_same_snapshot(served: Served) -> None:
    """Held-out samples of every task: same labels, same accuracy, same model_version on both fronts."""
    assert served.daemon.serve_port is not None
    client = served.client()
    with PredictionClient("127.0.0.1", served.daemon.serve_port) as sock:
        for task in served.stream.tasks:
            xs = task.test_x[:200].reshape(len(task.test_x[:200]), -1).astype(np.float32)
            ys = task.test_y[: len(xs)]
            socket_reply = sock.predict_batch(xs)
            result = _triton_infer(client, xs)
            assert result.get_response()["model_version"] == str(socket_reply["model_version"])
            http_labels = [v.decode() for v in result.as_numpy("label").tolist()]
            socket_labels = [str(r["label"]) for r in socket_reply["results"]]
            assert http_labels == socket_labels
            acc = float(np.mean(np.asarray(http_labels) == np.asarray([str(y) for y in ys])))
            assert acc > 0.5, acc


def test_bad_requests_get_their_status_and_the_daemon_serves_on(served: Served) -> None:
    """400 (JSON, tensor, datatype, shape), 404 (model, version), 405, 413; then a good request works."""
    port, path = served.port, f"/v2/models/{MODEL}/infer"
    snapshot = served.daemon.holder.get()
    assert snapshot is not None
    xs = served.stream.tasks[0].test_x[:2].reshape(2, -1).astype(np.float32)
    good = infer_body(xs)
    wrong_type = infer_body(xs)
    wrong_type["inputs"][0]["datatype"] = "INT64"
    wrong_shape = infer_body(xs)
    wrong_shape["inputs"][0]["shape"] = [2, 3]
    short = infer_body(xs)
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    cases: list[tuple[str, Any, int, str]] = [
        (path, b"{not json", 400, "not valid JSON"),
        (path, {"inputs": "x"}, 400, "exactly one tensor"),
        (path, wrong_type, 400, "FP32"),
        (path, wrong_shape, 400, "values per row"),
        (path, short, 400, "holds"),
        ("/v2/models/nope/infer", good, 404, "unknown model"),
        (f"/v2/models/{MODEL}/versions/0/infer", good, 404, "not served"),
        (path, b"x" * (served.config.serve.max_frame_bytes + 1), 413, "max_frame_bytes"),
    ]
    for where, body, status, message in cases:
        got, reply = http(port, where, body)
        assert (got, message in reply["error"]) == (status, True), (where, got, reply)
    assert http(port, "/v2/health/live", b"{}")[0] == 405  # POST on a GET route
    assert http(port, "/v3/nothing")[0] == 404
    status, reply = http(port, path, good)
    assert status == 200 and reply["model_version"] == str(snapshot.version)
    assert served.daemon.failed is None


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "server.pem", d / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def test_replica_serves_http_with_token_and_tls(served: Served, certs: tuple[str, str]) -> None:
    """`stream-cl serve --follow` answers OIP v2 over TLS with a bearer token, at the learner's version."""
    cert, key = certs
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_cl.cli", "serve", "--follow", served.snapshot_topic,
         "--set", f"kafka.bootstrap_servers={served.config.kafka.bootstrap_servers}",
         "--set", "serve.port=0", "--set", f"serve.http_port={http_port}", "--set", "metrics.enabled=false",
         "--set", "serve.token=s3cret", "--set", f"serve.tls_cert={cert}", "--set", f"serve.tls_key={key}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=cert)
    bearer = {"Authorization": "Bearer s3cret"}
    try:

        def ready() -> bool:
            try:
                return http(http_port, "/v2/health/ready", context=context)[0] == 200
            except OSError:
                return False

        wait_until(ready, 90, "the replica's HTTP front to be ready")
        snapshot = served.daemon.holder.get()
        assert snapshot is not None
        meta_path = f"/v2/models/{MODEL}"
        assert http(http_port, meta_path, context=context)[0] == 401
        assert (
            http(http_port, meta_path, headers={"Authorization": "Bearer wrong"}, context=context)[0] == 401
        )
        status, meta = http(http_port, meta_path, headers=bearer, context=context)
        assert status == 200 and meta["versions"] == [str(snapshot.version)]
        with pytest.raises(OSError):  # plain HTTP against the TLS front (URLError or a dropped connection)
            http(http_port, "/v2/health/live")
        client = triton.InferenceServerClient(
            f"127.0.0.1:{http_port}", ssl=True, ssl_options={"ca_certs": cert}
        )
        xs = served.stream.tasks[0].test_x[:20].reshape(20, -1).astype(np.float32)
        result = _triton_infer(client, xs, headers=bearer)
        assert result.get_response()["model_version"] == str(snapshot.version)
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), snapshot.predict(xs).proba, rtol=1e-5, atol=1e-6
        )
        with pytest.raises(InferenceServerException):
            _triton_infer(client, xs)  # no token
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def printed(capsys: pytest.CaptureFixture[str]) -> Any:
    """The CLI's JSON line (the in-process daemon may log to stdout around it)."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_predict_over_http(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    """`stream-cl predict --http` prints what the socket's `predict` prints: labels, version, accuracy."""
    from stream_cl.cli import main

    snapshot = served.daemon.holder.get()
    assert snapshot is not None and served.daemon.serve_port is not None
    base = ["predict", "--http", "--host", "127.0.0.1", "--port", str(served.port)]
    x = served.stream.tasks[0].test_x[0].ravel()
    assert main([*base, "--health"]) == 0
    assert printed(capsys) == {"ok": True, "status": "ready"}
    assert main([*base, "--x", json.dumps(x.tolist())]) == 0
    over_http = printed(capsys)
    with PredictionClient("127.0.0.1", served.daemon.serve_port) as sock:
        over_socket = sock.predict(x)
    assert (over_http["label"], over_http["model_version"]) == (
        over_socket["label"],
        over_socket["model_version"],
    )
    assert main([*base, "--stream", "split-digits", "--n", "300"]) == 0
    scored = printed(capsys)
    assert scored["samples"] == 300 and scored["accuracy"] > 0.5
    assert main([*base, "--info"]) == 0
    assert printed(capsys)["model_version"] == snapshot.version
    assert main([*base[:-1], "1", "--health"]) == 1  # nothing listens on port 1


def test_per_key_daemon_names_each_model_by_its_key(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A models.per_key daemon: /v2/models/{key} is that key's model, at its version, with its labels."""
    from test_keyed import KEYS, _config, _learned, _produce

    topic = f"http-keyed-{time.monotonic_ns()}"
    broker.create_topic(topic, partitions=4)
    config = _config(
        *kafka_overrides(broker.bootstrap_servers, topic),
        "serve.port=0",
        "metrics.enabled=false",
        f"checkpoint.dir={tmp_path}",
    )
    daemon = Daemon(config)
    daemon.start()
    try:
        assert daemon.http_port is not None and daemon.serve_port is not None
        assert http(daemon.http_port, "/v2/health/ready")[0] == 503
        rng = np.random.default_rng(0)
        _produce(broker.bootstrap_servers, topic, 60, 0, rng)
        wait_until(lambda: _learned(daemon) == dict.fromkeys(KEYS, 60), 120, "every sample learned")
        assert daemon.wait_idle(30)  # no more learning: both fronts answer from the same snapshots
        xs = np.stack([np.full(4, 1.0 if n % 2 == 0 else -1.0, np.float32) for n in range(8)])
        client = triton.InferenceServerClient(f"127.0.0.1:{daemon.http_port}")
        with PredictionClient("127.0.0.1", daemon.serve_port) as sock:
            for i, key in enumerate(KEYS):
                assert client.is_model_ready(key)
                result = _triton_infer_model(client, key, xs)
                socket_reply = sock.predict_batch(xs, key=key)
                assert result.get_response()["model_name"] == key
                assert result.get_response()["model_version"] == str(socket_reply["model_version"])
                labels = [str(r["label"]).encode() for r in socket_reply["results"]]
                assert result.as_numpy("label").tolist() == labels
                assert {int(v) for v in result.as_numpy("label").tolist()} <= {10 * i, 10 * i + 1}
        assert http(daemon.http_port, f"/v2/models/{MODEL}/ready")[0] == 404  # no unkeyed model here
        assert http(daemon.http_port, "/v2/models/k9")[0] == 404
    finally:
        daemon.stop()


def _triton_infer_model(
    client: triton.InferenceServerClient, model: str, xs: np.ndarray
) -> triton.InferResult:
    tensor = triton.InferInput("x", list(xs.shape), "FP32")
    tensor.set_data_from_numpy(xs)
    return client.infer(model, [tensor])
