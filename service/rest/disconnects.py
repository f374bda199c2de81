"""The HTTP side of a client going away: once a request's body has been read, the next ASGI message is the
disconnect (or the end of the response). Work awaited through until_disconnected is cancelled when it comes, and the
request is answered 499 (service/rest/errors.py), counted but sent nowhere."""

from __future__ import annotations

from typing import Awaitable, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..serving.pipeline import ClientGone, until_gone

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away. Only once the body has been read."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it and raise ClientDisconnect (answered as 499)."""
    try:
        return await until_gone(work, _disconnected(request))
    except ClientGone:
        raise ClientDisconnect() from None
