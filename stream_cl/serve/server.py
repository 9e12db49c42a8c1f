"""The prediction socket (docs/socket-protocol.md): length-prefixed msgpack over TCP.

Frame = 4-byte big-endian length N, then N bytes holding one msgpack map. Ops: `predict`,
`predict_batch`, `health`, `info`, `auth`. Replies echo the request's `id` and, on a connection,
come back in request order, so a pipelining client can match them by position as well as by id.

Why it is built this way:
- One asyncio event loop in one background thread owns every socket: a connection costs a
  protocol object and a timer, not a thread, and the caller of `start()` is never blocked.
- The torch forward runs on ONE worker thread, not on the loop, so a slow forward cannot stall
  reading, writing or timeouts. The one exception costs nobody: with a single client connected
  and forwards under a millisecond, its requests are predicted on the loop (batcher.py), saving
  the two thread hand-offs that would cost about as much as the forward. Predict requests that
  arrive while the worker is busy (or within `serve.batch_wait_ms` of each other) and share a task hint are stacked into one
  `Snapshot.predict` call; every reply of a batch comes from the same snapshot and carries its
  version. The batcher waits for companions only while some open connection could still send
  one, so a lone sequential client pays no batching delay.
- A peer can only cost bounded memory and time: frames above `serve.max_frame_bytes` are refused
  from their header, a frame must complete within `serve.read_timeout_s`, idle connections go
  after `serve.idle_timeout_s`, at most `serve.max_connections` are served, and a connection that
  pipelines without reading its replies stops being read.
- Optional TLS (`serve.tls_cert` + `serve.tls_key`, TLS >= 1.2) wraps the same protocol; the
  handshake must finish within `serve.read_timeout_s`, and a failed handshake (e.g. a plain-TCP
  client) never reaches a `SocketConnection`, so it costs nothing beyond the socket.
- Optional per-connection rate limit (`serve.max_requests_per_s`, token bucket with one second of
  burst): a request over it is answered `bad_request` / "rate limit exceeded", without running it,
  and the connection stays open. Rejecting rather than delaying keeps the server's memory and
  timers independent of how hard a client pushes; an honest client just backs off.
- With `serve.http_enabled` the same loop also serves the Open Inference Protocol v2 over HTTP
  (`serve.http_port`, serve/http.py), feeding the same batcher from the same registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from types import TracebackType
from typing import Any

from stream_cl.config import ServeConfig
from stream_cl.log import get_logger
from stream_cl.metrics import Metrics
from stream_cl.serve.batcher import Batcher, Slot
from stream_cl.serve.connection import LINGER_S, MAX_IN_FLIGHT_PER_CONNECTION, RATE_LIMITED, SocketConnection
from stream_cl.serve.frames import HEADER
from stream_cl.serve.http import HttpFront
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.requests import (
    server_ssl_context,
)
from stream_cl.serve.snapshot import SnapshotHolder

__all__ = ["HEADER", "MAX_IN_FLIGHT_PER_CONNECTION", "RATE_LIMITED", "PredictionServer", "server_ssl_context"]


class PredictionServer:
    """Serves the latest snapshot of each model in `models` on a TCP socket from a background thread.

    `models`: a `SnapshotHolder` (one model; requests carry no `key`) or a `SnapshotRegistry`
    (a keyed registry routes each request by its `key` field).

    Records `metrics.predict_seconds` (request decoded to reply written) and
    `metrics.predictions` (samples) for every successful prediction request.
    """

    def __init__(
        self,
        config: ServeConfig,
        models: SnapshotHolder | SnapshotRegistry,
        metrics: Metrics | None = None,
        logger: Any = None,
    ) -> None:
        self.config = config
        self.registry = models if isinstance(models, SnapshotRegistry) else SnapshotRegistry.single(models)
        self.metrics = metrics
        self.log = logger if logger is not None else get_logger("stream_cl.serve.server")
        self.batcher = Batcher(config, self.anyone_could_send, self.lone_client, self.log)
        self.port: int | None = None
        self.http: HttpFront | None = HttpFront(self) if config.http_enabled else None
        self.http_port: int | None = None  # bound before start() returns
        self._connections: set[SocketConnection] = set()
        self._admitted = 0
        self.busy_connections = 0  # admitted, open, and owing replies or closing
        self.rate_limited = 0  # requests refused by serve.max_requests_per_s (loop thread only)
        self.tls = bool(config.tls_cert or config.tls_key)
        self.stopping = False  # set on the loop thread once stop() has been asked for
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._drain_timeout = 5.0

    def start(self) -> int:
        """Bind (config port 0 = any free port), start serving, return the bound port."""
        if self._thread is not None:
            raise RuntimeError("PredictionServer.start() called twice")
        bound: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(bound,), name="stream_cl-serve", daemon=True)
        self._thread.start()
        self.port = bound.result()  # re-raises a bind error in the caller
        return self.port

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new connections, answer every request already read (for up to `drain_timeout`
        seconds), close all connections and the listener. Idempotent."""
        loop, stop_requested, thread = self._loop, self._stop_requested, self._thread
        if thread is None:
            return
        if loop is not None and stop_requested is not None and not loop.is_closed():
            self._drain_timeout = drain_timeout
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(drain_timeout + LINGER_S + 5.0)

    def __enter__(self) -> PredictionServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- called on the loop thread by connections and the batcher --------------------------
    def admit(self, conn: SocketConnection) -> bool:
        self._connections.add(conn)
        if self.stopping or self._admitted >= self.config.max_connections:
            return False
        self._admitted += 1
        return True

    def release(self, conn: SocketConnection) -> None:
        self._connections.discard(conn)
        if conn.admitted:
            self._admitted -= 1
        self.batcher.poke()

    def anyone_could_send(self) -> bool:
        """Whether waiting for more predict requests can pay off: some client (socket or HTTP) is
        between requests."""
        return self._admitted > self.busy_connections or (self.http is not None and self.http.could_send())

    def lone_client(self) -> bool:
        """Whether one client (socket or HTTP) is connected and it awaits its replies: nobody else's
        reading, writing or companion request can be kept waiting by a forward on the loop."""
        http = 0 if self.http is None else self.http.open_connections()
        return self._admitted + http == 1 and not self.anyone_could_send()

    def record_prediction(self, slot: Slot) -> None:
        """Successful predictions only: an error reply says nothing about serving latency."""
        if self.metrics is not None:
            self.metrics.predict_seconds.observe(time.perf_counter() - slot.started)
            self.metrics.predictions.inc(slot.samples)

    # -- the loop thread ----------------------------------------------------------------------
    def _run(self, bound: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(bound))
        except BaseException as e:
            if not bound.done():
                bound.set_exception(e)
            else:
                self.log.exception("serve_crashed")
        finally:
            self.batcher.shutdown()
            loop.close()

    async def _serve(self, bound: concurrent.futures.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        context = server_ssl_context(self.config)
        server = await loop.create_server(
            lambda: SocketConnection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            ssl=context,
            ssl_handshake_timeout=self.config.read_timeout_s if context is not None else None,
        )
        port = int(server.sockets[0].getsockname()[1])
        if self.http is not None:
            try:
                self.http_port = await self.http.start()
            except BaseException:
                server.close()
                raise
        self.batcher.start(loop)
        bound.set_result(port)
        self.log.info(
            "serve_started",
            host=self.config.host,
            port=port,
            http_port=self.http_port,
            auth=bool(self.config.token),
            tls=self.tls,
        )
        await self._stop_requested.wait()

        # From here a new connection is told the server is stopping and closed; what was already
        # read is answered within the drain timeout.
        self.stopping = True
        deadline = loop.time() + self._drain_timeout
        http_stopped = None if self.http is None else loop.create_task(self.http.stop(self._drain_timeout))
        for conn in list(self._connections):
            conn.drain()
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.005)
        # Stop accepting before closing the listener: an accept already under way needs two loop
        # iterations to reach connection_made, and if the server closes first asyncio (3.11)
        # leaks its socket to the garbage collector.
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        server.close()
        for conn in list(self._connections):
            conn.abort()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost and close sockets
        await server.wait_closed()
        if http_stopped is not None:
            await http_stopped
        self.log.info("serve_stopped", port=port)
