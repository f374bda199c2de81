"""What a route takes from the application: the server's state, and the model version a request goes to (named in
the request's scope for the request metrics, service/rest/middlewares.py)."""

from __future__ import annotations

from fastapi import Request

from ..serving.models import ServedModel
from ..serving.state import ServerState


async def get_state(request: Request) -> ServerState:
    # async: FastAPI runs a plain function dependency in a worker thread, a round trip of 0.1-0.3 ms per request.
    return request.app.state.reskd


def served(request: Request, state: ServerState, name: str, version: str | None = None) -> ServedModel:
    model = state.model(name, version)
    request.scope["reskd.model"] = (model.name, model.version)
    return model
