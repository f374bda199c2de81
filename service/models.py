"""The served models: every version of every model in the repository, each with its runtime and batch queue."""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from reskd.manifest import Manifest, ManifestError, ModelRepository
from reskd.runtime import CascadeResult, CascadeRuntime

from .batching import RequestBatcher
from .errors import not_found
from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger("reskd.service")


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    runtime: CascadeRuntime
    batcher: RequestBatcher

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
    def last_stage(self) -> int:
        return self.runtime.num_stages - 1

    async def classify(self, images: np.ndarray, threshold: float | None, max_stage: int | None) -> CascadeResult:
        return await self.batcher.submit(images, threshold, max_stage)

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Run every stage at each batch size once, so the first requests do not pay for allocation."""
        c, h, w = self.runtime.input_shape
        for n in batch_sizes:
            self.runtime.run(np.zeros((n, c, h, w), np.float32), early_exit=False)


def session_options(settings: ServeSettings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # Stages run one after another in one inference thread, so a single call may use every core.
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class ModelStore:
    def __init__(self, settings: ServeSettings, metrics: Metrics, executor: Executor, providers: list[str]):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.providers = providers
        self.repo = ModelRepository(settings.repo)
        self._models: dict[str, dict[int, ServedModel]] = {}

    def load(self) -> None:
        """Open a session per stage for every version (files verified by sha256 first). Must run on the loop's
        thread: batch queues belong to the running event loop."""
        names = self.repo.models()
        if not names:
            raise ManifestError(f"model repository {self.repo.root} holds no model versions")
        opts = session_options(self.settings)
        for name in names:
            for version in self.repo.versions(name):
                path = self.repo.resolve(name, version)
                runtime = CascadeRuntime(path, providers=self.providers, session_options=opts)
                batcher = RequestBatcher(
                    runtime, self.executor, self.metrics, model=name, version=version,
                    max_batch_size=self.settings.max_batch_size,
                    max_queue_delay_s=self.settings.max_queue_delay_ms / 1000,
                    max_queue_images=self.settings.max_queue_images, teacher_flops=runtime.manifest.teacher.flops)
                self._models.setdefault(name, {})[version] = ServedModel(name, version, path, runtime, batcher)
                self.metrics.register_model(name, version, runtime.num_stages)
                log.info("loaded %s version %d: %d stages on %s", name, version, runtime.num_stages,
                         runtime.sessions[0].get_providers()[0])

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
