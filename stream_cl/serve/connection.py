"""One client of the prediction socket: frames in, replies out in request order, the
per-connection limits (frame size, read and idle timeouts, in-flight replies, rate) enforced.
The server that accepts connections is `server.PredictionServer`; this module sees it only as a
`ConnectionHost`."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from typing import Any, Protocol, cast

import msgpack
import numpy as np

from stream_cl.config import ServeConfig
from stream_cl.serve.batcher import Batcher, PredictJob, Slot
from stream_cl.serve.frames import HEADER, RequestError, error_frame, pack_frame
from stream_cl.serve.registry import SnapshotRegistry
from stream_cl.serve.requests import (
    features,
    model_holder,
    model_info,
    model_status,
    task_hint,
)


class ConnectionHost(Protocol):
    """What a connection needs of the server that accepted it."""

    config: ServeConfig
    registry: SnapshotRegistry
    batcher: Batcher
    log: Any
    stopping: bool
    rate_limited: int
    busy_connections: int

    def admit(self, conn: SocketConnection) -> bool: ...
    def release(self, conn: SocketConnection) -> None: ...
    def record_prediction(self, slot: Slot) -> None: ...


OPS = ("predict", "predict_batch", "health", "info", "auth")
# Replies a connection may owe before the server stops reading from it: a client that writes
# requests without reading replies must not grow server memory without bound.
MAX_IN_FLIGHT_PER_CONNECTION = 1024
# When the server closes a connection itself (too_large, read timeout, refusal, idle) it half-closes
# and discards input for at most this long, so its last reply is not destroyed by a TCP reset.
LINGER_S = 2.0
RATE_LIMITED = "rate limit exceeded"


class SocketConnection(asyncio.Protocol):
    """One client: parses frames, answers them in order, enforces the per-connection limits."""

    def __init__(self, server: ConnectionHost) -> None:
        self._server = server
        self._config = server.config
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pending: deque[Slot] = deque()
        self._authed = not server.config.token
        self.admitted = False
        self._frame_started: float | None = None  # loop time the current partial frame began
        self._last_active = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._read_paused = False
        self._draining = False  # server stopping: read nothing more, answer what was read
        self._closing = False  # answer what was read, then close
        self._linger = False  # on close: half-close and discard input, so the last reply arrives
        self._lingering_since: float | None = None
        self._peer_eof = False
        self._lost = False
        self._busy = False  # owes replies or is closing: it will send no request the batcher can await
        # Token bucket for serve.max_requests_per_s: starts full (one second of burst, at least 1).
        self._rate = server.config.max_requests_per_s
        self._tokens = max(1.0, self._rate)
        self._tokens_at = self._last_active

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.admitted = self._server.admit(self)
        if self._server.stopping:  # accepted just before the listening socket closed
            self._close_after(error_frame(None, "not_ready", "server is stopping"), linger=False)
            return
        if not self.admitted:
            limit = self._config.max_connections
            self._server.log.warning("serve_connection_refused", max_connections=limit)
            self._close_after(error_frame(None, "not_ready", f"server at max_connections ({limit})"))
            return
        self._arm(self._last_active + self._config.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._pending.clear()
        self._refresh_busy()
        if self._timer is not None:
            self._timer.cancel()
        if exc is not None:
            self._server.log.debug("serve_connection_error", error=str(exc))
        self._server.release(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:  # lingering or draining: input is discarded, never buffered
            return
        self._last_active = self._loop.time()
        self._buf += data
        self._parse()

    def eof_received(self) -> bool:
        """The peer is done sending: answer every complete frame it sent, then close.

        Over TLS a peer's close_notify ends the session both ways (asyncio cannot keep it half
        open), so replies still on the batcher then die with it; plain TCP keeps the write side.
        """
        self._peer_eof = True
        if self._lingering_since is not None:
            return False
        if not self._closing:
            self._parse(limit_in_flight=False)
            self._buf.clear()
            self._close_after(None, linger=False)
        return self._transport is not None and self._transport.can_write_eof()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- frames -----------------------------------------------------------------------------
    def _parse(self, limit_in_flight: bool = True) -> None:
        if self._lost:  # a parse scheduled on resume can run after the peer vanished
            return
        buf = self._buf
        max_frame = self._config.max_frame_bytes
        while len(buf) >= HEADER.size and not self._closing:
            if limit_in_flight and len(self._pending) >= MAX_IN_FLIGHT_PER_CONNECTION:
                break
            (n,) = HEADER.unpack_from(buf)
            if n > max_frame:
                self._server.log.warning("serve_frame_too_large", size=n, max_frame_bytes=max_frame)
                msg = f"frame of {n} bytes exceeds serve.max_frame_bytes ({max_frame})"
                self._close_after(error_frame(None, "too_large", msg))
                return
            if len(buf) < HEADER.size + n:
                break
            payload = bytes(buf[HEADER.size : HEADER.size + n])
            del buf[: HEADER.size + n]
            self._handle(payload)
        partial = bool(buf) and not self._closing and len(self._pending) < MAX_IN_FLIGHT_PER_CONNECTION
        if not partial:
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = self._loop.time()
            self._arm(self._frame_started + self._config.read_timeout_s)
        self._update_reading()

    def _handle(self, payload: bytes) -> None:
        started = time.perf_counter()
        rid: Any = None
        try:
            try:
                request = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception:  # msgpack raises several unrelated types on garbage
                raise RequestError("bad_request", "frame is not valid msgpack") from None
            if not isinstance(request, dict):
                raise RequestError("bad_request", f"frame holds {type(request).__name__}, not a map")
            rid = request.get("id")
            if self._rate > 0 and not self._take_token():
                raise RequestError("bad_request", RATE_LIMITED)
            op = request.get("op")
            if not self._authed and op != "auth":
                raise RequestError("unauthorized", "authenticate first: {'op': 'auth', 'token': ...}")
            if op in ("predict", "predict_batch"):
                self._submit_predict(request, rid, started, batch=op == "predict_batch")
                return
            self._reply(pack_frame({"id": rid, "ok": True, **self._answer(op, request)}))
        except RequestError as e:
            self._reply(error_frame(rid, e.code, e.message))
        except Exception:
            self._server.log.exception("serve_request_failed")
            self._reply(error_frame(rid, "internal", "internal server error"))

    def _take_token(self) -> bool:
        """Refill the bucket for the time elapsed and spend one token if there is one."""
        now = self._loop.time()
        burst = max(1.0, self._rate)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            self._server.rate_limited += 1
            return False
        self._tokens -= 1.0
        return True

    def _answer(self, op: Any, request: dict[Any, Any]) -> dict[str, Any]:
        """Replies of the ops that need no forward (without `id` and `ok`)."""
        registry = self._server.registry
        key = request.get("key")
        if op == "health":
            return {"status": model_status(registry, key)}
        if op == "info":
            return model_info(registry, key)
        if op == "auth":
            token = request.get("token")
            if not isinstance(token, str):
                raise RequestError("bad_request", "'token' must be a string")
            expected = self._config.token
            if expected and not hmac.compare_digest(token.encode(), expected.encode()):
                raise RequestError("unauthorized", "wrong token")
            self._authed = True
            return {}
        raise RequestError("bad_request", f"unknown op {op!r}; expected one of {', '.join(OPS)}")

    def _submit_predict(self, request: dict[Any, Any], rid: Any, started: float, batch: bool) -> None:
        holder = model_holder(self._server.registry, request.get("key"))
        snapshot = holder.get()
        if snapshot is None:
            raise RequestError("not_ready", "no model snapshot published yet")
        task = task_hint(request.get("task"), snapshot)
        size = snapshot.input_size
        if batch:
            raw = request.get("xs")
            max_batch = self._config.max_batch
            if not isinstance(raw, list) or not raw:
                raise RequestError("bad_request", "'xs' must be a non-empty array of feature vectors")
            if len(raw) > max_batch:
                raise RequestError("bad_request", f"'xs' holds {len(raw)} samples (max_batch {max_batch})")
            xs = np.stack([features(v, size, f"xs[{i}]") for i, v in enumerate(raw)])
        else:
            if "x" not in request:
                raise RequestError("bad_request", "'x' is required")
            xs = features(request["x"], size, "x")[None, :]
        slot = Slot(started, len(xs))
        self._pending.append(slot)
        self._refresh_busy()
        self._server.batcher.submit(PredictJob(self, slot, rid, xs, task, batch, holder))

    # -- replies ----------------------------------------------------------------------------
    def _reply(self, frame: bytes) -> None:
        """Answer now, unless earlier requests are still owed a reply (keeps replies in order)."""
        if self._pending:
            self._pending.append(Slot(frame=frame))
        else:
            self._write(frame)
            self._maybe_finish()

    def flush(self) -> None:
        """Write every reply at the head of the order that is ready, in one send."""
        if self._lost:
            return
        ready: list[bytes] = []
        pending = self._pending
        while pending and pending[0].frame is not None:
            slot = pending.popleft()
            ready.append(cast(bytes, slot.frame))
            if slot.samples:
                self._server.record_prediction(slot)
        if ready:
            self._write(b"".join(ready))
        self._refresh_busy()
        self._update_reading()
        self._maybe_finish()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
            self._last_active = self._loop.time()

    def _refresh_busy(self) -> None:
        """Keep the server's count of busy clients current; the batcher reads it on every arrival."""
        busy = self.admitted and (bool(self._pending) or self._closing) and not self._lost
        if busy != self._busy:
            self._busy = busy
            self._server.busy_connections += 1 if busy else -1

    # -- closing and limits -----------------------------------------------------------------
    def _close_after(self, frame: bytes | None, linger: bool = True) -> None:
        """Stop taking requests; send `frame` after the replies still owed, then close."""
        self._closing = True
        self._linger = linger
        self._buf.clear()
        self._frame_started = None
        self._refresh_busy()
        if frame is not None:
            self._reply(frame)
        else:
            self._maybe_finish()
        self._server.batcher.poke()  # this client will send nothing more: don't wait for it

    def drain(self) -> None:
        """Server stop: read nothing more, answer what was read, then close without lingering."""
        self._draining = True
        self._update_reading()
        if self._lingering_since is not None:
            self.abort()
        else:
            self._close_after(None, linger=False)

    def abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _maybe_finish(self) -> None:
        transport = self._transport
        if not self._closing or self._pending or transport is None or transport.is_closing():
            return
        if self._linger and not self._peer_eof and transport.can_write_eof():
            if self._lingering_since is None:
                self._lingering_since = self._loop.time()
                transport.write_eof()
                self._arm(self._lingering_since + min(LINGER_S, self._config.read_timeout_s))
        else:
            transport.close()

    def _update_reading(self) -> None:
        paused = self._draining or self._write_paused or len(self._pending) >= MAX_IN_FLIGHT_PER_CONNECTION
        transport = self._transport
        if paused == self._read_paused or transport is None or transport.is_closing():
            return
        self._read_paused = paused
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()
            self._loop.call_soon(self._parse)  # frames buffered while paused

    def _arm(self, when: float) -> None:
        """Make sure the timer fires no later than `when`; `_on_timer` works out what is due."""
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        config = self._config
        if self._lingering_since is not None:
            deadline = self._lingering_since + min(LINGER_S, config.read_timeout_s)
            if now >= deadline:
                transport.abort()
            else:
                self._arm(deadline)
        elif self._frame_started is not None and not self._read_paused and not self._closing:
            deadline = self._frame_started + config.read_timeout_s
            if now < deadline:
                self._arm(deadline)
                return
            self._server.log.warning("serve_read_timeout", read_timeout_s=config.read_timeout_s)
            msg = f"frame not completed within serve.read_timeout_s ({config.read_timeout_s} s)"
            self._close_after(error_frame(None, "bad_request", msg))
        elif self._closing or self._pending or self._read_paused:
            self._arm(now + config.idle_timeout_s)  # busy, not idle
        else:
            deadline = self._last_active + config.idle_timeout_s
            if now < deadline:
                self._arm(deadline)
                return
            self._server.log.debug("serve_idle_timeout", idle_timeout_s=config.idle_timeout_s)
            self._close_after(None)
