"""Python client for the prediction socket (docs/socket-protocol.md), torch-free: part of the
`stream-cl-client` distribution (client/pyproject.toml), re-exported as `stream_cl.serve.client`.

Blocking and dependency-light (socket, msgpack, numpy) so it drops into notebooks, scripts and
load generators alike. One client = one connection; it is not thread-safe (give each thread its
own). With `tls=True` (or an `ssl.SSLContext`) the connection is TLS and the server's certificate
is verified against `cafile` (else the system trust store) and `host`. The convenience methods send one request and wait for its reply; `send`/`recv` pipeline
many requests on the connection (the server answers them in order, each echoing its `id`).
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import msgpack
import numpy as np

_HEADER = struct.Struct(">I")


class PredictionError(RuntimeError):
    """The server answered `ok: false`; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _to_wire(obj: Any) -> Any:
    """msgpack `default` hook: numpy feature arrays go as compact float32 LE bytes."""
    if isinstance(obj, np.ndarray):
        return np.ascontiguousarray(obj, dtype="<f4").reshape(-1).tobytes()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send {type(obj).__name__}")


def _rows(xs: Any) -> list[Any]:
    """A batch as one feature vector per sample: rows of a 2-D+ array, or the items of a list."""
    if isinstance(xs, np.ndarray):
        if xs.ndim > 1:
            return list(xs.reshape(len(xs), -1)) if len(xs) else []  # reshape(0, -1) is ambiguous
        return [xs]
    return list(xs)


def _request(op: str, task: int | str | None, key: str | None, **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"op": op, **fields}
    if task is not None:
        request["task"] = task
    if key is not None:
        request["key"] = key
    return request


def client_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """Verifying client context (hostname + chain), TLS >= 1.2; `cafile` trusts a private CA or a
    self-signed server certificate instead of the system store."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class PredictionClient:
    """A connection to a `PredictionServer`; authenticates on connect when `token` is given.

    `tls`: False = plain TCP; True = TLS verified with `client_ssl_context(cafile)`; an
    `ssl.SSLContext` = TLS with exactly that context (e.g. client certificates, pinning).
    A `cafile` alone implies `tls=True`: asking to verify a certificate never means plain TCP.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7070,
        token: str | None = None,
        timeout: float = 10.0,
        tls: bool | ssl.SSLContext = False,
        cafile: str | None = None,
        reconnect: bool = True,
    ) -> None:
        """`reconnect`: when the connection drops (a server restart, an idle timeout, a load
        balancer moving on), the convenience calls open a new one, authenticate again and resend
        their request once. Safe because every op is idempotent; pipelined `send`/`recv` never
        reconnect (replies in flight would be lost)."""
        self._address = (host, port)
        self._timeout = timeout
        self._tls = tls
        self._cafile = cafile
        self._token = token
        self.reconnect = reconnect
        self.reconnects = 0  # connections re-opened after a drop
        self._sock = self._connect()
        self._buf = bytearray()
        self._next_id = 0
        self._outstanding = 0
        if token:
            try:
                self._call({"op": "auth", "token": token}, retry=False)
            except BaseException:
                self.close()
                raise

    def _connect(self) -> socket.socket:
        host, port = self._address
        sock = socket.create_connection((host, port), timeout=self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not False or self._cafile:
                tls = self._tls
                context = tls if isinstance(tls, ssl.SSLContext) else client_ssl_context(self._cafile)
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _reopen(self) -> None:
        """A new connection in place of a dropped one, authenticated as the first was."""
        self._sock.close()
        self._sock = self._connect()
        self._buf.clear()
        self._outstanding = 0
        self.reconnects += 1
        if self._token:
            self._call({"op": "auth", "token": self._token}, retry=False)

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- convenience calls -------------------------------------------------------------------
    # `key` picks the model on a server that learns one model per key (a tenant, a sensor, ...);
    # leave it out for a single-model server.
    def predict(self, x: Any, task: int | str | None = None, key: str | None = None) -> dict[str, Any]:
        """Predict one sample; returns `{"id", "ok", "label", "proba", "task", "model_version"}`."""
        return self._call(_request("predict", task, key, x=x))

    def predict_batch(
        self, xs: Iterable[Any] | np.ndarray, task: int | str | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """Predict several samples in one request; `results` holds one entry per sample."""
        return self._call(_request("predict_batch", task, key, xs=_rows(xs)))

    def health(self, key: str | None = None) -> dict[str, Any]:
        return self._call(_request("health", None, key))

    def info(self, key: str | None = None) -> dict[str, Any]:
        """The model's info; on a keyed server without `key`: `{"keys": [...], "models": n}`."""
        return self._call(_request("info", None, key))

    def _call(self, request: dict[str, Any], retry: bool = True) -> dict[str, Any]:
        if self._outstanding:
            raise RuntimeError(f"{self._outstanding} pipelined replies are unread: recv() them first")
        try:
            self.send(request)
            reply = self.recv()
        except (ConnectionError, ssl.SSLError) as e:  # dropped (reset, EOF, broken pipe)
            if not (retry and self.reconnect):
                raise
            try:
                self._reopen()
            except OSError:
                raise e from None
            self.send(request)
            reply = self.recv()
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise PredictionError(str(error.get("code", "unknown")), str(error.get("message", "")))
        return reply

    # -- pipelining --------------------------------------------------------------------------
    def send(self, request: dict[str, Any]) -> Any:
        """Send one request without waiting; returns its `id` (assigned when the request has none).

        numpy arrays anywhere in `request` go as flat float32 bytes, so `xs` must be a list of them.
        """
        if "id" not in request:
            request = {**request, "id": self._next_id}
            self._next_id += 1
        payload = msgpack.packb(request, use_bin_type=True, default=_to_wire)
        self._sock.sendall(_HEADER.pack(len(payload)) + payload)
        self._outstanding += 1
        return request["id"]

    def recv(self) -> dict[str, Any]:
        """The next reply on this connection, `ok: false` replies included (they are not raised)."""
        (n,) = _HEADER.unpack(self._read_exact(_HEADER.size))
        reply = msgpack.unpackb(self._read_exact(n), raw=False, strict_map_key=False)
        self._outstanding = max(0, self._outstanding - 1)
        if not isinstance(reply, dict):
            raise PredictionError("bad_reply", f"server sent {type(reply).__name__}, not a map")
        return reply

    def _read_exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            chunk = self._sock.recv(max(65536, n - len(buf)))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data
