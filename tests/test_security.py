"""Prediction-socket hardening: TLS, the per-connection rate limit, and the auth token (from the
environment, compared in constant time). Real servers on free ports, real sockets, a self-signed
certificate generated per module with the `openssl` CLI."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from support import kafka_overrides

from stream_cl import cli
from stream_cl.config import ConfigError, ServeConfig, load_config
from stream_cl.runtime.daemon import Daemon
from stream_cl.serve.client import PredictionClient, PredictionError
from stream_cl.serve.server import RATE_LIMITED, PredictionServer, server_ssl_context
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.types import TaskId

INPUT = 4
HEADER = struct.Struct(">I")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, as PEM files (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "server.pem", d / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "1",
            "-subj", "/CN=stream_cl test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return str(cert_path), str(key_path)


def _snapshot() -> Snapshot:
    def predict(x: torch.Tensor, task: TaskId | None) -> tuple[torch.Tensor, list[TaskId | None]]:
        return torch.softmax(torch.stack([x.sum(1), -x.sum(1)], 1), dim=1), [None] * len(x)

    return Snapshot(
        version=7, strategy="test", labels=(0, 1), tasks=(), input_shape=(INPUT,), predictor=predict
    )


def _server(**overrides: object) -> PredictionServer:
    holder = SnapshotHolder()
    holder.publish(_snapshot())
    config = ServeConfig(port=0, http_port=0, **overrides)  # type: ignore[arg-type]
    return PredictionServer(config, holder)


@pytest.fixture
def tls_server(certs: tuple[str, str]) -> Iterator[PredictionServer]:
    """A TLS prediction server with the module's self-signed certificate."""
    cert, key = certs
    with _server(tls_cert=cert, tls_key=key) as server:
        yield server


def test_tls_client_gets_predictions(tls_server: PredictionServer, certs: tuple[str, str]) -> None:
    """A client trusting the self-signed certificate predicts over TLS 1.2+."""
    assert tls_server.port is not None
    with PredictionClient("127.0.0.1", tls_server.port, tls=True, cafile=certs[0]) as client:
        reply = client.predict(np.ones(INPUT, np.float32))
        assert reply["label"] == 0 and reply["model_version"] == 7
        batch = client.predict_batch(-np.ones((3, INPUT), np.float32))
        assert [r["label"] for r in batch["results"]] == [1, 1, 1]
        version = client._sock.version()  # type: ignore[attr-defined]
        assert version in ("TLSv1.2", "TLSv1.3")


def test_plain_client_against_tls_server_fails_cleanly(
    tls_server: PredictionServer, certs: tuple[str, str]
) -> None:
    """A plain-TCP client gets a connection error (no reply, no hang) and the server stays up."""
    assert tls_server.port is not None
    for _ in range(3):
        with pytest.raises(OSError), PredictionClient("127.0.0.1", tls_server.port, timeout=5) as plain:
            plain.health()
    with PredictionClient("127.0.0.1", tls_server.port, cafile=certs[0]) as client:
        assert client.health()["status"] == "ready"


def test_tls_client_rejects_untrusted_certificate(tls_server: PredictionServer) -> None:
    """Without the cafile the self-signed certificate fails verification; the server floor is TLS 1.2."""
    assert tls_server.port is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        PredictionClient("127.0.0.1", tls_server.port, tls=True, timeout=5)
    context = server_ssl_context(tls_server.config)
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_against_plain_server_fails_cleanly() -> None:
    """A TLS client against a plain server fails with an SSL error and the server stays up."""
    with _server() as server:
        assert server.port is not None
        with pytest.raises(OSError):
            PredictionClient("127.0.0.1", server.port, tls=True, timeout=5)
        with PredictionClient("127.0.0.1", server.port) as client:
            assert client.health()["status"] == "ready"


def test_cli_predict_tls(
    tls_server: PredictionServer, certs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream-cl predict --tls --cafile PATH --health` talks TLS; without --tls it fails with exit 1."""
    base = ["predict", "--host", "127.0.0.1", "--port", str(tls_server.port), "--timeout", "5", "--health"]
    assert cli.main([*base, "--tls", "--cafile", certs[0]]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ready"
    assert cli.main(base) == 1
    assert "stream-cl predict:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"tls_cert": "CERT"}, "serve.tls_key"),
        ({"tls_key": "KEY"}, "serve.tls_cert"),
        ({"tls_cert": "CERT", "tls_key": "/nonexistent/key.pem"}, "serve.tls_key"),
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "KEY"}, "serve.tls_cert"),
        ({"tls_cert": "KEY", "tls_key": "KEY"}, "serve.tls_cert"),  # a key is not a certificate
    ],
)
def test_tls_config_errors_name_the_key(certs: tuple[str, str], overrides: dict[str, str], key: str) -> None:
    """Half a TLS config, an unreadable file or a mismatched pair is a ConfigError naming the key."""
    cert, private = certs
    values = [f"serve.{k}={v.replace('CERT', cert).replace('KEY', private)}" for k, v in overrides.items()]
    with pytest.raises(ConfigError) as info:
        load_config(None, values, env={})
    assert info.value.key == key


def test_tls_config_accepts_a_pair(certs: tuple[str, str]) -> None:
    """A readable certificate and matching key load; both empty (the default) means plain TCP."""
    config = load_config(None, [f"serve.tls_cert={certs[0]}", f"serve.tls_key={certs[1]}"], env={})
    assert config.serve.tls_cert == certs[0]
    assert load_config(None, [], env={}).serve.tls_cert == ""


def _pipeline(sock: socket.socket, n: int) -> list[dict[str, object]]:
    payload = b"".join(
        HEADER.pack(len(p)) + p for p in (msgpack.packb({"op": "health", "id": i}) for i in range(n))
    )
    sock.sendall(payload)
    buf = b""
    replies: list[dict[str, object]] = []
    while len(replies) < n:
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        buf += chunk
        while len(buf) >= 4 and len(buf) >= 4 + HEADER.unpack_from(buf)[0]:
            (size,) = HEADER.unpack_from(buf)
            replies.append(msgpack.unpackb(buf[4 : 4 + size]))
            buf = buf[4 + size :]
    return replies


def test_rate_limit_per_connection() -> None:
    """Over serve.max_requests_per_s a request gets bad_request "rate limit exceeded"; the connection
    stays usable, refills with time, and another connection has its own budget."""
    with _server(max_requests_per_s=5.0) as server:
        assert server.port is not None
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            replies = _pipeline(sock, 20)
            assert [r["id"] for r in replies] == list(range(20))
            ok = [r for r in replies if r["ok"]]
            limited = [r for r in replies if not r["ok"]]
            assert 5 <= len(ok) <= 6  # the burst, plus at most one token refilled meanwhile
            assert all(r["error"] == {"code": "bad_request", "message": RATE_LIMITED} for r in limited)
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as other:
                assert sum(bool(r["ok"]) for r in _pipeline(other, 5)) == 5
            time.sleep(0.5)  # refills ~2.5 tokens
            assert _pipeline(sock, 1)[0]["ok"] is True
        assert server.rate_limited >= 14


def test_rate_limit_off_by_default() -> None:
    """serve.max_requests_per_s = 0 (the default) never refuses a request."""
    assert ServeConfig().max_requests_per_s == 0
    with _server() as server, socket.create_connection(("127.0.0.1", server.port or 0), timeout=5) as sock:
        assert all(r["ok"] for r in _pipeline(sock, 500))
    with pytest.raises(ConfigError, match="serve.max_requests_per_s"):
        load_config(None, ["serve.max_requests_per_s=-1"], env={})


def test_token_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The auth token check goes through hmac.compare_digest (no early-exit string comparison)."""
    import stream_cl.serve.connection as serve  # where a connection checks the token

    calls: list[tuple[bytes, bytes]] = []
    real = serve.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve.hmac, "compare_digest", spy)
    with _server(token="s3cret") as server:
        assert server.port is not None
        with pytest.raises(PredictionError, match="unauthorized"):
            PredictionClient("127.0.0.1", server.port, token="wrong", timeout=5)
        with PredictionClient("127.0.0.1", server.port, token="s3cret", timeout=5) as client:
            assert client.health()["ok"] is True
    assert calls == [(b"wrong", b"s3cret"), (b"s3cret", b"s3cret")]


def test_daemon_token_from_environment(broker: EmbeddedBroker, topic: str, tmp_path: Path) -> None:
    """STREAM_CL_SERVE__TOKEN makes a real daemon require `auth` before any other op."""
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.enabled=false",
            "evaluation.holdout_fraction=0",
            f"checkpoint.dir={tmp_path}",
        ],
        env={"STREAM_CL_SERVE__TOKEN": "from-env"},
    )
    assert config.serve.token == "from-env"
    daemon = Daemon(config)
    daemon.start()
    try:
        assert daemon.serve_port is not None
        with PredictionClient("127.0.0.1", daemon.serve_port, timeout=5) as anonymous:
            with pytest.raises(PredictionError) as info:
                anonymous.health()
            assert info.value.code == "unauthorized"
        with pytest.raises(PredictionError, match="unauthorized"):
            PredictionClient("127.0.0.1", daemon.serve_port, token="nope", timeout=5)
        with PredictionClient("127.0.0.1", daemon.serve_port, token="from-env", timeout=5) as client:
            assert client.health()["status"] == "starting"  # no sample yet: authed, not ready
    finally:
        daemon.stop()
    assert daemon.failed is None
