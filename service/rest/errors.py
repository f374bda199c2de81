"""Every error leaves as JSON {"error": "<what is wrong and how to fix it>"} with the status docs/design.md ("Errors")
names: the serving layer's ServingError with its own status (and Retry-After when it says when to try again), FastAPI's
validation and routing errors in the same form. No stack trace ever reaches a client; unexpected exceptions are
logged here and answered with a 500."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import Send

from reskd.validation import describe

from ..serving.errors import ServingError

log = logging.getLogger("reskd.service")

CLIENT_CLOSED_REQUEST = 499


def retry_headers(err: ServingError) -> dict[str, str]:
    return {} if err.retry_after_s is None else {"Retry-After": str(err.retry_after_s)}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """The same JSON error, sent as raw ASGI messages: for middlewares and apps outside FastAPI's handlers."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, err: ServingError):
        return error_response(err.status, err.message, retry_headers(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError):
        return error_response(422, "; ".join(describe(err, skip=("body",))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path} (see /docs for the API)")
        if err.status_code == 405:
            # Every method the path takes, not only the first matching route's (GET and POST
            # /v2/repository/index are two routes).
            allowed = sorted({m for r in request.app.routes if isinstance(r, Route)
                              and r.matches(request.scope)[0] != Match.NONE for m in r.methods or ()})
            return error_response(405, f"{request.method} is not allowed on {request.url.path} (allowed: "
                                       f"{', '.join(allowed)})", {**err.headers, "Allow": ", ".join(allowed)})
        return error_response(err.status_code, str(err.detail), err.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect):
        # Nobody to answer: the response goes nowhere, its status is what the request metrics count (nginx's 499,
        # "client closed request"; 408 when the server closed a connection whose body was too slow).
        timed_out = request.scope.get("reskd.timed_out", False)
        log.info("%s %s: %s", request.method, request.url.path,
                 "request body timed out" if timed_out else "the client went away; its work was dropped")
        return Response(status_code=408 if timed_out else CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(err).__name__}); the server logged the details")
