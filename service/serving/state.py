"""What every front end shares in one server process: settings, metrics, the model store and its control, the
inference and decoding pools, readiness."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..settings import ServeSettings
from .budget import BodyBudget
from .control import Coordinator, ModelControl
from .decoding import DecodePool
from .errors import unavailable
from .metrics import Metrics
from .models import ModelStore, ServedModel, ServingDevice


log = logging.getLogger("reskd.service")


def lowest_priority() -> None:
    """The calling thread at nice 19 (Linux schedules threads by their own nice value), where the system allows."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: the audit runs at the process's priority
        pass


class ServerState:
    def __init__(self, settings: ServeSettings, serving: ServingDevice, worker: Coordinator | None = None):
        """worker: this process is one of several workers (service/supervisor.py): its link to the supervisor
        (service/link.py)."""
        self.settings = settings
        self.metrics = Metrics(worker.index if worker is not None else 0)
        self.bodies = BodyBudget(settings.max_inflight_body_bytes, settings.retry_after_s)
        # One thread budget for every model: `workers` stage batches at once, each with the device's onnxruntime
        # threads (on CPU by default one batch using every core). Decoding has its own small pool.
        self.inference = ThreadPoolExecutor(serving.workers, thread_name_prefix="reskd-infer")
        self.decoding = DecodePool(settings.decode_workers)
        # The shadow audit's own thread (service/serving/audit.py): an audit that hangs never holds an inference slot,
        # and at the lowest CPU priority an audit batch gives way to the requests' stages on the cores it shares.
        self.audit = ThreadPoolExecutor(1, thread_name_prefix="reskd-audit", initializer=lowest_priority)
        self.worker = worker
        self.store = ModelStore(settings, self.metrics, self.inference, serving, self.audit)
        if worker is None:
            self.control = ModelControl(settings, self.store, self.metrics, self.inference)
        else:
            self.control = ModelControl(settings, self.store, self.metrics, self.inference, coordinator=worker,
                                        generation=worker.generation, leader=worker.index == 0,
                                        unloaded=worker.unloaded, restarted=worker.restarted)
        self.metrics.describe_models(self.control.live, lambda: list(self.control.refused))
        self.ready = False
        self.failed = False
        self.draining = False  # shutting down: readiness answers 503, responses close their connections
        # Called when loading or warming up fails after the port opened (`reskd serve` then exits with status 2).
        self.on_failure: Callable[[], None] = lambda: None
        # Called when the supervisor of this worker is gone (service/supervisor.py): shut down as on SIGTERM.
        self.on_lost: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Open every version (unless `reskd serve` did before the port opened), warm each up in the inference
        thread and start serving it (service/serving/control.py); ready after."""
        try:
            if not self.control.opened_all:
                self.control.open_all()
            await self.control.start()
            self.ready = True
            if self.worker is not None:
                self.worker.mark_warm()
            self.metrics.ready.set(1)
            log.info("ready: %s", ", ".join(f"{m.name}/{m.version}" for m in self.store.all()) or "no model yet")
        except Exception:
            self.failed = True
            log.exception("loading the models failed; the server stops")
            self.on_failure()

    def drain(self) -> None:
        """Shutting down: not ready from now on (load balancers stop sending), requests still served."""
        self.draining = True
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        await self.control.stop()
        for model in self.store.all():
            await model.scheduler.stop()
        self.inference.shutdown(wait=True, cancel_futures=True)
        self.audit.shutdown(wait=False, cancel_futures=True)
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
        cold = self.worker.cold_workers() if readiness and self.worker is not None else []
        if cold:  # this worker is warm, another on the same port is not: no traffic to the server yet
            raise unavailable(f"not ready: worker {', '.join(map(str, cold))} of this server is still warming up",
                              self.settings.retry_after_s)

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The version a request goes to (the highest when none is named), once ready and after any model change
        the other workers have applied (service/serving/control.py)."""
        self.require_ready()
        self.control.sync()
        return self.store.get(name, version)
