"""Per-connection limits of the HTTP front (serve/http.py) that aiohttp does not enforce itself:
the connection cap, the time to send a request's headers, the idle time before the first
request, and the request rate. The socket's settings, applied the socket's way."""

from __future__ import annotations

import asyncio
import json
from typing import Any


def raw_reply(status: str, message: str) -> bytes:
    """A complete HTTP/1.1 error reply that closes the connection, for where aiohttp is not involved."""
    body = json.dumps({"error": message}).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


class Refuse(asyncio.Protocol):
    """A connection over `serve.max_connections` (or during stop): one 503, then closed."""

    def __init__(self, message: str) -> None:
        self.message = message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(raw_reply("503 Service Unavailable", self.message))
        transport.close()


class Bucket:
    """Token bucket of one connection (one second of burst, at least 1), as the socket's."""

    __slots__ = ("tokens", "at")

    def __init__(self, rate: float, now: float) -> None:
        self.tokens = max(1.0, rate)
        self.at = now

    def take(self, rate: float, now: float) -> bool:
        """Refill for the time elapsed and spend one token if there is one."""
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Deadlines(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection and closes it when a client stalls:

    - a request whose first bytes arrived but whose handler has not started (headers still
      coming) within `read_timeout_s`: answered 408 and closed (the body has its own timeout in
      the handler);
    - nothing at all sent within `idle_timeout_s` of connecting (between requests aiohttp's
      keep-alive timeout, set to the same value, takes over).

    The front marks `in_request` around each handler (its middleware) and keeps `bucket`, the
    connection's rate limit, here.
    """

    def __init__(self, inner: Any, read_timeout_s: float, idle_timeout_s: float, rate: float) -> None:
        self.inner = inner
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.in_request = False
        self.requests = 0
        self.bucket = Bucket(rate, 0.0) if rate > 0 else None
        self._loop = asyncio.get_running_loop()
        self._began: float | None = None  # loop time the current request's first bytes came
        self._connected = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- the front's marks ----------------------------------------------------------------------
    def request_started(self) -> None:
        self.in_request = True
        self.requests += 1

    def request_done(self) -> None:
        self.in_request = False
        self._began = None

    # -- asyncio.Protocol, delegated --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self._arm(self._connected + self.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._began is None and not self.in_request:
            self._began = self._loop.time()
            self._arm(self._began + self.read_timeout_s)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- timer --------------------------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self.in_request:  # the handler runs: the body read and the forward have their own limits
            self._arm(now + self.read_timeout_s)
        elif self._began is not None:
            if now >= self._began + self.read_timeout_s:
                message = (
                    f"request headers not received within serve.read_timeout_s ({self.read_timeout_s} s)"
                )
                transport.write(raw_reply("408 Request Timeout", message))
                transport.close()
            else:
                self._arm(self._began + self.read_timeout_s)
        elif self.requests == 0:
            if now >= self._connected + self.idle_timeout_s:
                transport.close()
            else:
                self._arm(self._connected + self.idle_timeout_s)
        # else: between requests; aiohttp's keep-alive timeout closes an idle connection
