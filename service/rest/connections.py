"""Connections: how long a client may take, and how many may be open.

uvicorn's only timer is the keep-alive one, armed after a response: a connection that never sends a request, or
sends part of one and stalls, is kept forever, and nothing bounds how many there are. ConnectionGuard adds, for
uvicorn's HTTP protocol classes (h11 or httptools, whichever uvicorn picked):

- idle: a connection with no request in progress and no byte received for keep_alive_s is closed;
- headers: a request's headers must arrive within header_timeout_s of its first byte (408 otherwise);
- body: its body within body_timeout_s of its headers (408; the route sees a disconnect and drops the request);
- a connection limit: a new connection beyond max_connections closes the oldest one running no request (idle, or
  still sending headers); if every connection is running a request, the new one's request is answered 503 with
  Retry-After. Beyond the limit plus a margin, connections are closed at once, so the process never reaches its
  file-descriptor limit (where accept() fails and nothing, health checks included, gets through).

One timer per server sweeps the connections every fraction of a second, so a timeout fires within that fraction of
its deadline. The guard works on the protocol's `cycle` (the request being served), `transport` and `app`, which
both of uvicorn's HTTP implementations have.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from .errors import send_error

# Connections beyond the limit that still get a 503 (then closed); beyond this margin they are closed at once.
REFUSAL_MARGIN = 64
# How long a connection closed with a response keeps reading (and discarding) what its client still sends.
LINGER_S = 2.0


def raw_response(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection, written straight to the transport
    where no ASGI response can be (no request, or one whose body never came)."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """One per server: the open connections (oldest first), their timers, and the limit."""

    def __init__(self, *, keep_alive_s: float, header_timeout_s: float, body_timeout_s: float,
                 max_connections: int, retry_after_s: int, on_close: Callable[[str], None] | None = None,
                 on_count: Callable[[int], None] | None = None):
        self.keep_alive_s = keep_alive_s
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.retry_after_s = retry_after_s
        self.on_close = on_close or (lambda reason: None)
        self.on_count = on_count or (lambda n: None)
        self.connections: dict[asyncio.Protocol, None] = {}  # insertion order: oldest first
        self.interval = min(0.25, keep_alive_s / 4, header_timeout_s / 4, body_timeout_s / 4)
        self._timer: asyncio.TimerHandle | None = None

    def protocol(self, base: type) -> type:
        """uvicorn's HTTP protocol class `base`, guarded: pass it as uvicorn.Config(http=...)."""
        return type(f"Guarded{base.__name__}", (_Guarded, base), {"guard": self})

    # --- events from the protocols -----------------------------------------------------------------------------
    def opened(self, conn: _Guarded) -> None:
        self.connections[conn] = None
        if len(self.connections) > self.max_connections:
            self._make_room(conn)
        self.on_count(len(self.connections))
        if self._timer is None:
            self._schedule()

    def closed(self, conn: _Guarded) -> None:
        if self.connections.pop(conn, 0) is None:
            self.on_count(len(self.connections))

    def _make_room(self, newcomer: _Guarded) -> None:
        for conn in self.connections:
            if conn is not newcomer and not conn.serving:
                self._close(conn, "evicted")
                return
        if len(self.connections) > self.max_connections + REFUSAL_MARGIN:
            self._close(newcomer, "refused")
            return
        # Every connection is running a request: this one's request gets a 503 instead of the app.
        newcomer.app = _refusal(self.retry_after_s, self.max_connections)
        self.on_close("refused")

    def _close(self, conn: _Guarded, reason: str, response: bytes | None = None) -> None:
        """Close `conn`, with `response` first if given. A response is followed by a lingering close: the write
        side is shut (FIN after the response) while what the client still sends is read and discarded for up to
        LINGER_S, since closing a socket with unread input resets it and the client could lose the response."""
        self.connections.pop(conn, None)
        self.on_count(len(self.connections))
        self.on_close(reason)
        transport = conn.transport
        if response is None or transport.is_closing():
            transport.close()
            return
        conn.lingering = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    # --- the timer ---------------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            if conn.transport.is_closing():
                continue
            cycle = conn.cycle
            if conn.serving:
                if cycle is not conn._seen_cycle:  # a request that began since the last look (e.g. pipelined)
                    conn._seen_cycle, conn._headers_at = cycle, now
                if cycle.more_body and not cycle.response_started and now - conn._headers_at > self.body_timeout_s:
                    cycle.scope["reskd.timed_out"] = True  # the route's disconnect is then answered (counted) 408
                    self._close(conn, "body_timeout", raw_response(
                        408, "Request Timeout", f"the request body did not arrive within {self.body_timeout_s:g} s "
                        f"of its headers (RESKD_BODY_TIMEOUT_S)"))
            elif conn._first_byte_at is not None:
                if now - conn._first_byte_at > self.header_timeout_s:
                    self._close(conn, "header_timeout", raw_response(
                        408, "Request Timeout", f"the request headers did not arrive within "
                        f"{self.header_timeout_s:g} s (RESKD_HEADER_TIMEOUT_S)"))
            elif now - conn._idle_since > self.keep_alive_s:
                self._close(conn, "idle")
        if self.connections:
            self._schedule()


class _Guarded:
    """Mixed in before one of uvicorn's HTTP protocol classes (ConnectionGuard.protocol)."""

    guard: ConnectionGuard
    lingering = False  # closed with a response: input is discarded until the transport closes

    @property
    def serving(self) -> bool:
        """A request is in progress: headers received, response not yet complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._first_byte_at: float | None = None  # of a request whose headers are not complete yet
        self._seen_cycle = None
        self._headers_at = 0.0
        self.guard.opened(self)

    def connection_lost(self, exc) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        now = self.loop.time()
        if not self.serving and self._first_byte_at is None:
            self._first_byte_at = now
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # headers complete: a new request began
            self._first_byte_at = None
            self._seen_cycle, self._headers_at = self.cycle, now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = self.loop.time()


def _refusal(retry_after_s: int, limit: int):
    """The ASGI app a connection over the limit gets: 503 with Retry-After, connection closed after."""
    message = f"the server has {limit} connections open, all running requests (RESKD_MAX_CONNECTIONS); retry shortly"

    async def refuse(scope, receive, send) -> None:
        await send_error(send, 503, message, {"Retry-After": str(retry_after_s), "Connection": "close"})

    return refuse
