"""The Open Inference Protocol v2 REST front (docs/http-protocol.md): KServe's "V2 inference
protocol", as Triton, KServe and MLServer speak it, with Triton's binary tensor data extension.

One more front of `PredictionServer`, not a second server stack: it runs on the server's event
loop, reads the same `SnapshotRegistry` and submits to the same `Batcher` as the socket, so an
HTTP request and a socket request that arrive together share one forward. N rows in one infer
request are one batcher job.

aiohttp (not starlette under uvicorn) because it runs on a loop we own: uvicorn wants to own the
loop and the process (signals, workers), aiohttp's low-level runner only needs a protocol factory
for `loop.create_server`, which is also where the connection limit is enforced.

Limits match the socket's: `serve.max_connections` open connections (more are answered 503 and
closed), bodies over `serve.max_frame_bytes` refused from their Content-Length (413), headers and
then the body must each arrive within `serve.read_timeout_s` (408), idle connections close after
`serve.idle_timeout_s`, and `serve.max_requests_per_s` per connection (429 over it); see
serve/http_limits.py for the ones aiohttp does not enforce itself.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgpack
import numpy as np
from aiohttp import web

from stream_cl.config import ServeConfig
from stream_cl.serve.batcher import Batcher, PredictJob, Slot
from stream_cl.serve.frames import HEADER, RequestError
from stream_cl.serve.http_limits import Deadlines, Refuse
from stream_cl.serve.oip import (
    HEADER_LENGTH,
    INPUT,
    LABEL,
    PROBABILITIES,
    HttpError,
    infer_reply,
    parse_infer,
)
from stream_cl.serve.registry import SnapshotRegistry, UnroutableKey
from stream_cl.serve.requests import server_ssl_context, task_hint
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder

EXTENSIONS = ["binary_tensor_data"]
try:
    VERSION = importlib.metadata.version("stream-cl")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
# Needs no token: orchestrator probes carry none, and they reveal only up/ready.
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
STATUS = {"not_ready": 503, "bad_request": 400, "unauthorized": 401, "too_large": 413, "internal": 500}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpHost(Protocol):
    """What the front needs of the server it runs in."""

    config: ServeConfig
    registry: SnapshotRegistry
    batcher: Batcher
    log: Any
    stopping: bool
    rate_limited: int

    def record_prediction(self, slot: Slot) -> None: ...


class _Reply:
    """The batcher's `ReplyChannel` for one HTTP request: resolves a future with the reply frame."""

    __slots__ = ("future", "slot")

    def __init__(self, future: asyncio.Future[bytes], slot: Slot) -> None:
        self.future = future
        self.slot = slot

    def flush(self) -> None:
        if not self.future.done() and self.slot.frame is not None:
            self.future.set_result(self.slot.frame)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class HttpFront:
    """The `/v2` routes on `config.host`:`config.http_port`; `start()` and `stop()` on the loop."""

    def __init__(self, host: HttpHost) -> None:
        self.host = host
        self.config = host.config
        self.port: int | None = None
        self.busy = 0  # requests in progress (loop thread only)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None

    async def start(self) -> int:
        config = self.config
        app = web.Application(client_max_size=config.max_frame_bytes, middlewares=[self._guard])
        v2, model = "/v2", "/v2/models/{model}"
        app.router.add_get(f"{v2}/health/live", self.live)
        app.router.add_get(f"{v2}/health/ready", self.ready)
        app.router.add_get(v2, self.server_metadata)
        for base in (model, model + "/versions/{version}"):
            app.router.add_get(base, self.model_metadata)
            app.router.add_get(base + "/ready", self.model_ready)
            app.router.add_post(base + "/infer", self.infer)
        runner = self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=config.idle_timeout_s)
        await runner.setup()
        server = runner.server
        assert server is not None  # set by setup()
        limit = config.max_connections

        def accept() -> asyncio.BaseProtocol:
            if self.host.stopping:
                return Refuse("server is stopping")
            if len(server.connections) >= limit:
                self.host.log.warning("http_connection_refused", max_connections=limit)
                return Refuse(f"server at max_connections ({limit})")
            return Deadlines(
                server(), config.read_timeout_s, config.idle_timeout_s, config.max_requests_per_s
            )

        context = server_ssl_context(config)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            accept,
            config.host,
            config.http_port,
            reuse_address=True,
            ssl=context,
            ssl_handshake_timeout=config.read_timeout_s if context is not None else None,
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish (up to `timeout` s), close everything."""
        if self._listener is not None:
            self._listener.close()
        runner = self._runner
        if runner is not None and runner.server is not None:
            runner.server.pre_shutdown()  # idle keep-alive connections close now
            await runner.server.shutdown(timeout)
            await runner.cleanup()
        if self._listener is not None:
            await self._listener.wait_closed()

    def open_connections(self) -> int:
        runner = self._runner
        return 0 if runner is None or runner.server is None else len(runner.server.connections)

    def could_send(self) -> bool:
        """Whether some open HTTP connection is between requests (the batcher may wait for it)."""
        return self.open_connections() > self.busy

    # -- every request --------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Rate limit and token, then the handler; every error as `{"error": message}`."""
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if isinstance(conn, Deadlines):
            conn.request_started()  # headers are in: the connection's header deadline is met
        self.busy += 1
        try:
            bucket = conn.bucket if isinstance(conn, Deadlines) else None
            if bucket is not None and not bucket.take(self.config.max_requests_per_s, time.monotonic()):
                self.host.rate_limited += 1
                return error(429, "rate limit exceeded")
            if self.config.token and request.path not in OPEN_PATHS:
                given = request.headers.get("Authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.config.token.encode()
                ):
                    return error(401, "missing or wrong 'Authorization: Bearer <token>'")
            return await handler(request)
        except HttpError as e:
            return error(e.status, e.message)
        except RequestError as e:
            return error(STATUS.get(e.code, 400), e.message)
        except web.HTTPException as e:  # aiohttp's own: unknown route (404), wrong method (405), 413
            return error(e.status, e.reason)
        except Exception:
            self.host.log.exception("http_request_failed", path=request.path)
            return error(500, "internal server error")
        finally:
            self.busy -= 1
            if isinstance(conn, Deadlines):
                conn.request_done()

    def _model(self, request: web.Request) -> tuple[str, SnapshotHolder]:
        """The model the path names (404 if none such): a key, or `serve.model_name`."""
        name = request.match_info["model"]
        registry = self.host.registry
        if not registry.keyed:
            if name != self.config.model_name:
                raise HttpError(404, f"unknown model {name!r}; this server serves {self.config.model_name!r}")
            return name, registry.resolve(None)
        try:
            return name, registry.resolve(name)
        except UnroutableKey:
            raise HttpError(404, f"unknown model {name!r}: no model for that key here (yet)") from None

    def _snapshot(self, request: web.Request, holder: SnapshotHolder) -> Snapshot:
        """The model's serving snapshot (503 before the first); 404 if the path asks another version."""
        snapshot = holder.get()
        if snapshot is None:
            raise HttpError(503, "no model snapshot published yet")
        version = request.match_info.get("version")
        if version is not None and version != str(snapshot.version):
            raise HttpError(404, f"version {version!r} is not served; the model serves {snapshot.version}")
        return snapshot

    # -- routes ---------------------------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.host.registry.any_ready() and not self.host.stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "stream_cl", "version": VERSION, "extensions": EXTENSIONS})

    async def model_ready(self, request: web.Request) -> web.Response:
        _, holder = self._model(request)
        self._snapshot(request, holder)
        return web.json_response({"ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, holder = self._model(request)
        s = self._snapshot(request, holder)
        return web.json_response(
            {
                "name": name,
                "versions": [str(s.version)],
                "platform": "pytorch",
                "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *s.input_shape]}],
                "outputs": [
                    {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(s.labels)]},
                    {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
                ],
                "parameters": {"strategy": s.strategy, "classes": list(s.labels), "tasks": list(s.tasks)},
            },
            dumps=lambda obj: json.dumps(obj, default=_builtin),
        )

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        name, holder = self._model(request)
        snapshot = self._snapshot(request, holder)
        body = await self._body(request)
        parsed = parse_infer(
            body, request.headers.get(HEADER_LENGTH), snapshot.input_size, self.config.max_batch
        )
        task = task_hint(parsed.task, snapshot)
        slot = Slot(started, len(parsed.xs))
        reply = _Reply(asyncio.get_running_loop().create_future(), slot)
        self.host.batcher.submit(PredictJob(reply, slot, None, parsed.xs, task, True, holder, raw=True))
        frame = await reply.future
        if frame or slot.result is None:  # not predicted: the batcher's error frame says why
            error = msgpack.unpackb(frame[HEADER.size :], raw=False, strict_map_key=False)["error"]
            raise HttpError(STATUS.get(error["code"], 500), error["message"])
        self.host.record_prediction(slot)
        answered, proba = slot.result  # the snapshot that answered: its version and labels
        labels = [answered.labels[i] for i in proba.argmax(axis=1).tolist()]
        out, header_length = infer_reply(name, answered.version, parsed, proba, labels)
        if header_length is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(
            body=out, content_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
        )

    async def _body(self, request: web.Request) -> bytes:
        limit = self.config.max_frame_bytes
        length = request.content_length
        if length is not None and length > limit:
            self.host.log.warning("http_body_too_large", size=length, max_frame_bytes=limit)
            raise HttpError(413, f"body of {length} bytes exceeds serve.max_frame_bytes ({limit})")
        try:
            return await asyncio.wait_for(request.read(), self.config.read_timeout_s)
        except TimeoutError:
            msg = f"body not received within serve.read_timeout_s ({self.config.read_timeout_s} s)"
            raise HttpError(408, msg) from None


def _builtin(obj: Any) -> Any:
    """json `default`: numpy scalars (labels, task ids) as their Python value."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")
