"""What the routes share: settings, metrics, the model store, the worker pools and readiness."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import Request

from .decoding import DecodePool
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
        self.decoding = DecodePool(settings.decode_workers)
        self.store = ModelStore(settings, self.metrics, self.inference, serving)
        self.ready = False
        self.failed = False
        self.draining = False  # shutting down: readiness answers 503, responses close their connections
        # Called when loading or warming up fails after the port opened (`reskd serve` then exits with status 2).
        self.on_failure: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Load every model (unless `reskd serve` did before the port opened), warm each up in the inference
        thread, then start the batch queues; ready after."""
        try:
            if not self.store.loaded:
                self.store.load()
            loop = asyncio.get_running_loop()
            for model in self.store.all():
                await loop.run_in_executor(self.inference, model.runtime.engine.warm_up,
                                           self.settings.warmup_batch_sizes)
                model.scheduler.start()
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready: %s", ", ".join(f"{m.name}/{m.version}" for m in self.store.all()))
        except Exception:
            self.failed = True
            log.exception("loading the models failed; the server stops")
            self.on_failure()

    def drain(self) -> None:
        """Shutting down: not ready from now on (load balancers stop sending), requests still served."""
        self.draining = True
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        for model in self.store.all():
            await model.scheduler.stop()
        self.inference.shutdown(wait=True, cancel_futures=True)
        self.decoding.shutdown()

    def require_ready(self, readiness: bool = False) -> None:
        """503 unless every model is loaded and warmed up; for the readiness probe also while shutting down (the
        models still answer then, for requests already on their way). The reasons say what, never where (no server
        paths in responses: the log has the details)."""
        if readiness and self.draining:
            raise unavailable("the server is shutting down; send requests to another replica",
                              self.settings.retry_after_s)
        if not self.ready:
            why = "loading the models failed (see the server log)" if self.failed else "models are still loading"
            raise unavailable(f"not ready: {why}", self.settings.retry_after_s)

    def model(self, request: Request, name: str, version: str | None = None) -> ServedModel:
        self.require_ready()
        model = self.store.get(name, version)
        request.scope["reskd.model"] = (model.name, model.version)
        return model


def get_state(request: Request) -> ServerState:
    return request.app.state.reskd
