"""What the routes share: settings, metrics, the model store, the worker pools and readiness."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from .errors import unavailable
from .metrics import Metrics
from .models import ModelStore, ServedModel, ServingDevice
from .settings import ServeSettings

log = logging.getLogger("reskd.service")


class ServerState:
    def __init__(self, settings: ServeSettings, serving: ServingDevice):
        self.settings = settings
        self.metrics = Metrics()
        # One thread budget for every model: `workers` stage batches at once, each with the device's onnxruntime
        # threads (on CPU by default one batch using every core). Decoding has its own small pool.
        self.inference = ThreadPoolExecutor(serving.workers, thread_name_prefix="reskd-infer")
        self.decoding = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="reskd-decode")
        self.store = ModelStore(settings, self.metrics, self.inference, serving)
        self.ready = False
        self.failed: str | None = None

    async def start(self) -> None:
        """Load every model, warm each up in the inference thread, then start the batch queues; ready after."""
        try:
            self.store.load()
            loop = asyncio.get_running_loop()
            for model in self.store.all():
                await loop.run_in_executor(self.inference, model.runtime.engine.warm_up, self.settings.warmup_batch_sizes)
                model.scheduler.start()
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready: %s", ", ".join(f"{m.name}/{m.version}" for m in self.store.all()))
        except Exception as err:
            self.failed = f"{type(err).__name__}: {err}"
            log.exception("loading models failed; the server stays unready and not live")

    async def stop(self) -> None:
        for model in self.store.all():
            await model.scheduler.stop()
        self.inference.shutdown(wait=True, cancel_futures=True)
        self.decoding.shutdown(wait=False, cancel_futures=True)

    def require_ready(self) -> None:
        if not self.ready:
            why = f"loading failed: {self.failed}" if self.failed else "models are still loading"
            raise unavailable(f"not ready ({why})", self.settings.retry_after_s)

    def model(self, request: Request, name: str, version: str | None = None) -> ServedModel:
        self.require_ready()
        model = self.store.get(name, version)
        request.scope["reskd.model"] = (model.name, model.version)
        return model


def get_state(request: Request) -> ServerState:
    return request.app.state.reskd
