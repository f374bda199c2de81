"""The FastAPI application of one server process: the serving layer's state (service/serving/state.py) behind the
HTTP routes (v1, KServe v2, the repository extension, operations), their error handlers and middlewares."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

import reskd

from ..serving.control import Coordinator
from ..serving.models import ServingDevice
from ..serving.state import ServerState
from ..settings import ServeSettings
from . import errors, ops, openapi, repository, v1, v2
from .middlewares import BearerAuth, BodyLimit, RequestMetrics

DESCRIPTION = """Sample-adaptive early-exit classification with ResKD cascades. Every prediction says which stage
answered and the compute it used and saved. `/v1` is the simple API (multipart or raw images); `/v2` is the KServe v2
/ Triton HTTP protocol, binary tensor extension included."""


def create_app(settings: ServeSettings | None = None, serving: ServingDevice | None = None,
               worker: Coordinator | None = None) -> FastAPI:
    """serving: the device and thread budget, resolved by `reskd serve` for the whole process; by default resolved
    here, with a pool per session (an app inside another process, e.g. a test). worker: the app of one worker of
    several, its line to the supervisor (service/link.py)."""
    settings = settings or ServeSettings()
    state = ServerState(settings, serving or ServingDevice.resolve(settings), worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker is not None:
            worker.attach(asyncio.get_running_loop(), state.control, state.on_lost)
        loading = asyncio.create_task(state.start())  # live at once, ready after warm-up
        if worker is not None and worker.restarted:
            # A restarted worker: the others answer meanwhile, so it takes connections only once warm.
            await asyncio.shield(loading)
        yield
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await state.stop()

    app = FastAPI(title="reskd", version=reskd.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.reskd = state
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.include_router(ops.router)
    openapi.document(app)
    # Starlette wraps in reverse order of addition: RequestMetrics is outermost, so 401s and 413s are counted.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, budget=state.bodies)
    if settings.auth_token is not None:
        app.add_middleware(BearerAuth, token=settings.auth_token.get_secret_value())
    app.add_middleware(RequestMetrics, metrics=state.metrics, state=state)
    return app
