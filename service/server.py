"""The FastAPI application and `reskd serve`.

Start-up: the repository is checked (manifests, sha256 of every file) before the port opens, so a broken model
fails `reskd serve` at once with a message. The server then answers liveness at once and turns ready after every
model is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

import reskd
from reskd.manifest import ManifestError, ModelRepository

from . import errors, ops, v1, v2
from .logs import log_config
from .middlewares import BearerAuth, BodyLimit, RequestMetrics
from .models import ServingDevice, engine_spec
from .settings import ServeSettings
from .state import ServerState

log = logging.getLogger("reskd.service")

DESCRIPTION = """Sample-adaptive early-exit classification with ResKD cascades. Every prediction says which stage
answered and the compute it used and saved. `/v1` is the simple API (multipart or raw images); `/v2` is the KServe v2
/ Triton HTTP protocol, binary tensor extension included."""


def create_app(settings: ServeSettings | None = None, serving: ServingDevice | None = None) -> FastAPI:
    """serving: the device and thread budget, resolved by `serve` for the whole process; by default resolved
    here, with a pool per session (an app inside another process, e.g. a test)."""
    settings = settings or ServeSettings()
    state = ServerState(settings, serving or ServingDevice.resolve(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(state.start())  # live at once, ready after warm-up
        yield
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await state.stop()

    app = FastAPI(title="reskd", version=reskd.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.reskd = state
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(ops.router)
    v2.document(app)
    # Starlette wraps in reverse order of addition: RequestMetrics is outermost, so 401s and 413s are counted.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.auth_token is not None:
        app.add_middleware(BearerAuth, token=settings.auth_token.get_secret_value())
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    return app


def check_repository(settings: ServeSettings) -> None:
    """Fail before the port opens: every manifest valid, every stage file present with the right sha256."""
    repo = ModelRepository(settings.repo)
    names = repo.models()
    if not names:
        raise ManifestError(f"model repository {repo.root} holds no model versions (REPO/NAME/VERSION/manifest.json)")
    for name in names:
        for version in repo.versions(name):
            repo.load(name, version)
    if settings.default_model not in names:
        log.warning("default model %r is not in %s: POST /v1/classify will answer 404", settings.default_model,
                    repo.root)


def serve(settings: ServeSettings) -> None:
    config = log_config(settings.log_format, settings.log_level)
    logging.config.dictConfig(config)
    check_repository(settings)
    # Raises under --device cuda without the CUDA EP. One onnxruntime thread pool for every stage of every model:
    # the thread budget, with no idle pool spinning; it must exist before the first session.
    serving = ServingDevice.resolve(settings, shared_pool=True)
    engine_spec(settings, serving.device)  # raises ValueError for buckets that cannot hold a batch
    uvicorn.run(create_app(settings, serving), host=settings.host, port=settings.port, log_config=config,
                log_level=settings.log_level, timeout_graceful_shutdown=10)
