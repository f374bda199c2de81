"""The served models: every version of every model in the repository, each with its runtime and batch queue."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reskd.cascade import CascadeResult
from reskd.device import Device
from reskd.manifest import Manifest, ManifestError, ModelRepository
from reskd.runtime import CascadeRuntime

from .errors import not_found
from .metrics import Metrics, ModelMetrics
from .scheduler import CascadeScheduler
from .settings import ServeSettings
from .stages import BoundStages, HostStages, StageRunner

log = logging.getLogger("reskd.service")


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    runtime: CascadeRuntime
    runner: StageRunner
    scheduler: CascadeScheduler
    metrics: ModelMetrics

    @property
    def manifest(self) -> Manifest:
        return self.runtime.manifest

    @property
    def teacher_flops(self) -> int:
        return self.manifest.teacher.flops

    @property
    def cascade_flops(self) -> int:
        return int(self.runtime.cum_flops[-1])

    @property
    def device(self) -> str:
        return "cuda" if self.runtime.on_cuda else "cpu"

    async def classify(self, images: np.ndarray, threshold: float | None, max_stage: int | None) -> CascadeResult:
        return await self.scheduler.submit(images, threshold, max_stage)


def thread_budget(settings: ServeSettings, cuda: bool) -> tuple[int, int]:
    """-> (stage batches at once, onnxruntime threads each): one budget of the machine's cores."""
    workers = settings.inference_threads or (2 if cuda else 1)
    intra = settings.intra_op_threads or max(1, (os.cpu_count() or 1) // workers)
    return workers, intra


@dataclass(frozen=True)
class ServingDevice:
    """The device every served model runs on, and the thread budget: `workers` stage batches at once."""

    device: Device
    workers: int

    @classmethod
    def resolve(cls, settings: ServeSettings, shared_pool: bool = False) -> ServingDevice:
        """Raises RuntimeError under device=cuda without the CUDA EP. shared_pool: one onnxruntime pool of the
        budget's threads for every stage of every model (the `reskd serve` process; before any session)."""
        device = Device.resolve(settings.device, cudnn_conv_algo_search=settings.cudnn_conv_algo_search)
        workers, intra = thread_budget(settings, device.cuda)
        return cls(device.with_threads(intra, shared_pool), workers)


class ModelStore:
    def __init__(self, settings: ServeSettings, metrics: Metrics, executor: Executor, serving: ServingDevice):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.serving = serving
        self.repo = ModelRepository(settings.repo)
        self._models: dict[str, dict[int, ServedModel]] = {}

    def load(self) -> None:
        """Open a session per stage for every version (files verified by sha256 first). Must run on the loop's
        thread: batch queues belong to the running event loop."""
        names = self.repo.models()
        if not names:
            raise ManifestError(f"model repository {self.repo.root} holds no model versions")
        s = self.settings
        for name in names:
            for version in self.repo.versions(name):
                path = self.repo.resolve(name, version)
                runtime = CascadeRuntime(path, device=self.serving.device)
                runner = self._runner(runtime)
                metrics = self.metrics.for_model(name, version, runtime.stage_flops, runtime.manifest.teacher.flops)
                scheduler = CascadeScheduler(
                    runtime, runner, self.executor, model=name, version=version, policy=s.scheduler,
                    max_batch_sizes=s.stage_max_batch_size or [s.max_batch_size],
                    max_queue_delays_s=[d / 1000 for d in (s.stage_max_queue_delay_ms or [s.max_queue_delay_ms])],
                    max_queue_images=s.max_queue_images, pipeline_depth=self.serving.workers, observer=metrics)
                model = ServedModel(name, version, path, runtime, runner, scheduler, metrics)
                self._models.setdefault(name, {})[version] = model
                log.info("loaded %s version %d: %d stage(s) on %s (%s), scheduler %s", name, version,
                         runtime.num_stages, model.device, type(runner).__name__, s.scheduler)

    def _runner(self, runtime: CascadeRuntime) -> StageRunner:
        s = self.settings
        on_cuda = runtime.on_cuda
        if self.serving.device.cuda and not on_cuda:
            if s.device == "cuda":
                raise RuntimeError(f"device 'cuda' asked for, but onnxruntime could not create a CUDA session for "
                                   f"{runtime.path} (it fell back to the CPU); check the CUDA and cuDNN libraries")
            log.warning("CUDA execution provider failed for %s; serving it on CPU", runtime.path)
        if s.stage_runner == "bound" or (s.stage_runner == "auto" and on_cuda):
            return BoundStages(runtime, device="cuda" if on_cuda else "cpu", buckets=s.batch_buckets,
                               max_blocks=s.max_gather_blocks)
        return HostStages(runtime, s.warmup_batch_sizes)

    def all(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def get(self, name: str, version: str | int | None = None) -> ServedModel:
        versions = self._models.get(name)
        if not versions:
            raise not_found(f"no model {name!r} (served: {', '.join(self.names()) or 'none'})")
        if version is None or version == "":
            return versions[max(versions)]
        try:
            v = int(version)
        except (TypeError, ValueError):
            v = None
        if v not in versions:
            raise not_found(f"model {name!r} has no version {version!r} (versions: {sorted(versions)})")
        return versions[v]
