"""ASGI middlewares: request metrics (outermost, so refusals are counted too), bearer-token auth, body-size guard."""

from __future__ import annotations

import asyncio
import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..serving.budget import BodyBudget
from ..serving.errors import ServingError, too_large
from ..serving.metrics import Metrics
from .errors import retry_headers, send_error

# Always open, even with auth on: probes, scrapes and the API documentation.
OPEN_PATHS = ("/v2/health/", "/metrics", "/docs", "/redoc", "/openapi.json")


class BodyLimit:
    """Request bodies: refuse one over max_bytes with 413, at once from Content-Length or while streaming (chunked
    uploads); and bound the bytes of all bodies being received or held at once by the process's budget (shared
    with gRPC's messages): a request whose declared (or, chunked, received) length would pass it gets 503 +
    Retry-After before its body is read. A body's bytes count from its headers until its response: clients that send
    most of a large body and stall cannot hold more than the budget between them."""

    def __init__(self, app: ASGIApp, max_bytes: int, budget: BodyBudget):
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        message = (f"request body is over the limit of {limit:,} bytes (RESKD_MAX_BODY_BYTES); send fewer or "
                   f"smaller images per request")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await send_error(send, 400, "Content-Length is not a number")
            if int(length) > limit:
                return await send_error(send, 413, message)
        reserved = int(length) if length is not None else 0
        budget = self.budget
        try:
            budget.reserve(reserved)
        except ServingError as refusal:
            return await send_error(send, refusal.status, refusal.message, retry_headers(refusal))
        seen = 0

        async def guarded() -> Message:
            nonlocal seen, reserved
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise too_large(message)  # turned into a 413 by the app's ServingError handler
                if seen > reserved:  # a chunked body (or one longer than declared, which h11 refuses anyway)
                    budget.reserve(seen - reserved)  # the 503 when over, by the app's ServingError handler
                    reserved = seen
            return msg

        try:
            await self.app(scope, guarded, send)
        finally:
            budget.release(reserved)


class BearerAuth:
    """With a token set, every path but OPEN_PATHS needs `Authorization: Bearer <token>` (compared in constant
    time). 401 otherwise."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS) or scope["path"] == "/":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            what = "missing" if not header else "invalid"
            return await send_error(send, 401, f"{what} credentials: send 'Authorization: Bearer <token>' with the "
                                               f"server's RESKD_AUTH_TOKEN", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class RequestMetrics:
    """reskd_requests_total{endpoint,code} and reskd_request_duration_seconds{endpoint}; endpoint is the route
    template (bounded label values), model/version as resolved by the route ("" when none was).

    Outermost, it also owns what happens at shutdown: while the server drains (ServerState.draining) every response
    says `Connection: close`, so clients reconnect elsewhere; a request still running when the shutdown timeout
    cancels it is answered 503 with Retry-After (JSON, like every error) instead of the server's plain-text 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, state):
        self.app = app
        self.metrics = metrics
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_status(msg: Message) -> None:
            nonlocal status, started
            if msg["type"] == "http.response.start":
                status, started = msg["status"], True
                if self.state.draining:
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"connection", b"close")]}
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            if started:
                raise
            status = 503
            await send_error(send, 503, "the server shut down before this request finished; retry (on another "
                                        "replica)", {"Retry-After": str(self.state.settings.retry_after_s),
                                                     "Connection": "close"})
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "") if route is not None else ""
            model, version = scope.get("reskd.model", ("", ""))
            self.metrics.requests.labels(model, str(version), endpoint, str(status)).inc()
            seconds = time.perf_counter() - start
            self.metrics.request_duration.labels(model, str(version), endpoint).observe(seconds)
            if model and endpoint.endswith(("/classify", "/infer")):  # the statistics extension's success / fail
                outcome = "success" if status == 200 else "fail"
                self.metrics.inference_requests.labels(model, str(version), outcome).observe(seconds)
