"""The bytes of request bodies a server process holds at once (RESKD_MAX_INFLIGHT_BODY_BYTES), one budget shared by
both front ends: HTTP bodies from their headers until their response (rest/middlewares.py, BodyLimit), gRPC
messages from their handler's start until its answer (rpc/service.py). Used from the event loop only."""

from __future__ import annotations

from .errors import ServingError, unavailable


class BodyBudget:
    def __init__(self, limit: int, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.held = 0

    def over(self) -> ServingError:
        """The 503 (with its retry time) of a body that does not fit."""
        return unavailable(f"the server is holding {self.held:,} bytes of request bodies, its limit "
                           f"(RESKD_MAX_INFLIGHT_BODY_BYTES = {self.limit:,}); retry shortly", self.retry_after_s)

    def reserve(self, size: int) -> None:
        """Hold `size` more bytes; the 503 of over() when they do not fit (nothing held then)."""
        if self.held + size > self.limit:
            raise self.over()
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
