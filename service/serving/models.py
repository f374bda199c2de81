"""The served models: every version of every model in the repository, each with its runtime and batch queue."""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reskd.device import Device
from reskd.engine import EngineSpec
from reskd.machine import available_cores
from reskd.manifest import Manifest, ManifestError, ModelRepository
from reskd.runtime import CascadeRuntime

from .audit import Auditor, audit_reference
from .degrade import Controller, ladder
from .errors import not_found
from .metrics import Metrics, ModelMetrics
from .scheduler import CascadeScheduler, Policy
from ..settings import ServeSettings

log = logging.getLogger("reskd.service")


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    path: Path
    runtime: CascadeRuntime
    scheduler: CascadeScheduler
    metrics: ModelMetrics
    # What the version's folder held when it was loaded (service/serving/control.py): a change means a new load.
    fingerprint: Any = None

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


def thread_budget(settings: ServeSettings, cuda: bool, cores: int | None = None) -> tuple[int, int]:
    """-> (stage batches at once, onnxruntime threads each): one budget of the machine's cores. By default two
    batches at once (one on a single core), each with half the cores: on CUDA the host work of one overlaps the
    GPU work of the other; on CPU two batches keep the cores busy between one batch's Python steps, and on two
    cores each batch runs on its calling thread, with no onnxruntime pool busy-waiting beside the event loop
    (2 x 1 served 1.5x the v2 images/s of 1 x 2 with the same per-request CPU, docs/serving.md).
    cores: this process's share (a worker's, service/supervisor.py); default every core available to it."""
    cores = cores or available_cores()
    workers = settings.inference_threads or (2 if cuda or cores >= 2 else 1)
    intra = settings.intra_op_threads or max(1, cores // workers)
    return workers, intra


@dataclass(frozen=True)
class ServingDevice:
    """The device every served model runs on, and the thread budget: `workers` stage batches at once."""

    device: Device
    workers: int

    @classmethod
    def resolve(cls, settings: ServeSettings, shared_pool: bool = False, cores: int | None = None) -> ServingDevice:
        """Raises RuntimeError under device=cuda without the CUDA EP. shared_pool: one onnxruntime pool of the
        budget's threads for every stage of every model (the `reskd serve` process; before any session). cores:
        the process's share of the cores (default all available)."""
        device = Device.resolve(settings.device, cudnn_conv_algo_search=settings.cudnn_conv_algo_search)
        workers, intra = thread_budget(settings, device.cuda, cores)
        return cls(device.with_threads(intra, shared_pool), workers)


def scheduling_policy(s: ServeSettings, device: Device) -> Policy:
    """RESKD_SCHEDULER, with "auto" resolved per device: per-stage re-batching wins on CPU, where a stage's cost
    follows its batch's rows; on a GPU each stage call costs a launch whatever its rows, and request-level batching
    measured 7x the stage scheduler's throughput on an H200 (docs/serving.md)."""
    if s.scheduler != "auto":
        return s.scheduler
    return "request" if device.cuda else "stage"


def engine_spec(s: ServeSettings, device: Device) -> EngineSpec:
    """The engine every version runs on (reskd.engine). Raises ValueError where a bound engine's largest bucket
    cannot hold a batch the scheduler can form (its buffers are allocated once)."""
    spec = EngineSpec(s.stage_runner, s.cuda_graphs, tuple(s.batch_buckets), s.max_gather_blocks)
    if spec.resolve(device).kind == "bound":
        largest = max(s.batch_buckets)
        sizes = s.stage_max_batch_size or [s.max_batch_size]
        # The stage scheduler splits requests into batches of at most the max batch size; the request-level
        # ones take a whole request however large.
        stage = scheduling_policy(s, device) == "stage"
        needed = max(sizes) if stage else max(s.max_images, *sizes)
        if needed > largest:
            what = "the max batch size" if stage else "max_images and the max batch size"
            raise ValueError(f"the largest batch bucket ({largest}) must hold the largest batch the server can "
                             f"form ({needed}: {what}); raise RESKD_BATCH_BUCKETS or lower those")
    return spec


class ModelStore:
    """The routing table: which ServedModel answers each model name and version. Only the event loop changes or
    reads it, and a request resolves its model once, so swapping an entry is atomic: requests that resolved the old
    one finish on it (service/serving/control.py drains it), later ones get the new one."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, executor: Executor, serving: ServingDevice,
                 audit_executor: Executor | None = None):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.audit_executor = audit_executor
        self.serving = serving
        self.repo = ModelRepository(settings.repo)
        self._models: dict[str, dict[int, ServedModel]] = {}
        # Why a model, or one version (name, version), is not served: named in its 404s (set by the control).
        self.absent: dict[tuple[str, int | None], str] = {}

    def open(self, name: str, version: int) -> CascadeRuntime:
        """Verify one version and open it: manifest fields, the sha256 of every file, a session per stage (ONNX
        files that onnxruntime cannot load, e.g. truncated with a matching sha256, fail here). Raises ManifestError
        naming the version and the problem. Safe off the event loop."""
        path = self.repo.root / name / str(version)
        try:
            runtime = CascadeRuntime(path, device=self.serving.device, engine=self.engine_spec)
        except ManifestError:
            raise
        except Exception as err:  # onnxruntime refusing a file whose sha256 matches (e.g. truncated)
            raise ManifestError(f"{name} version {version} ({path}) cannot be loaded: {err}") from err
        self._check_device(runtime)
        return runtime

    def make(self, name: str, version: int, runtime: CascadeRuntime, fingerprint=None) -> ServedModel:
        """A version's metrics series and scheduler around an opened runtime (started by the caller, on the loop)."""
        s = self.settings
        metrics = self.metrics.for_model(name, version, runtime.manifest)
        controller = self.controller(runtime, metrics)
        cuda = self.serving.device.cuda
        threads = self.serving.device.threads or 1
        scheduler = CascadeScheduler(
            runtime, runtime.engine, self.executor, model=name, version=version, policy=self.policy,
            max_batch_sizes=s.stage_max_batch_size or [s.max_batch_size],
            max_queue_delays_s=[d / 1000 for d in (s.stage_max_queue_delay_ms or [s.max_queue_delay_ms])],
            max_queue_images=s.max_queue_images, pipeline_depth=self.serving.workers,
            max_wait_s=s.max_queue_wait_ms / 1000,
            min_admitted=s.decode_workers + self.serving.workers, observer=metrics, controller=controller,
            cost_clock="device" if cuda else "thread" if threads == 1 else "cores", cores=threads,
            auditor=self.auditor(runtime, metrics), audit_executor=self.audit_executor)
        model = ServedModel(name, version, runtime.path, runtime, scheduler, metrics, fingerprint)
        log.info("loaded %s version %d: %d stage(s) on %s (%s engine%s), scheduler %s", name, version,
                 runtime.num_stages, model.device, runtime.engine.kind,
                 ", CUDA graphs" if runtime.engine_spec.graphs else "", self.policy)
        return model

    def auditor(self, runtime: CascadeRuntime, metrics: ModelMetrics) -> Auditor | None:
        """The version's shadow audit (service/serving/audit.py), or None: RESKD_AUDIT_FRACTION 0, a one-stage
        version, or one without an audit model."""
        s = self.settings
        reference = audit_reference(runtime, s.audit_model) if s.audit_fraction > 0 else None
        if reference is None:
            return None
        return Auditor(runtime, reference, self.served_runtime, fraction=s.audit_fraction,
                       max_compute_pct=s.audit_max_compute_pct, observer=metrics)

    def served_runtime(self, name: str, version: int | None) -> CascadeRuntime | None:
        """The runtime serving NAME:VERSION now (the highest version when None), or None when it is not served."""
        versions = self._models.get(name, {})
        if not versions:
            return None
        model = versions.get(version if version is not None else max(versions))
        return model.runtime if model is not None else None

    def controller(self, runtime: CascadeRuntime, metrics: ModelMetrics) -> Controller | None:
        """The version's degrade controller (service/serving/degrade.py), or None: RESKD_DEGRADE off, or a version
        without a cheaper point within RESKD_DEGRADE_MAX_DROP_PT (it is shed-only)."""
        s = self.settings
        rungs = ladder(runtime.manifest, s.degrade_max_drop_pt) if s.degrade else []
        if len(rungs) < 2:
            return None
        metrics.ladder(rungs)
        return Controller(rungs, runtime.manifest.stage_flops, slo_s=s.latency_slo_ms / 1000,
                          hold_s=s.degrade_hold_s, shared=not self.serving.device.cuda, on_switch=metrics.switched)

    def put(self, model: ServedModel) -> ServedModel | None:
        """Serve `model` from now on; -> the one it replaces (same name and version), if any."""
        versions = self._models.setdefault(model.name, {})
        old = versions.get(model.version)
        versions[model.version] = model
        self.absent.pop((model.name, None), None)
        self.absent.pop((model.name, model.version), None)
        return old

    def remove(self, name: str, version: int, why: str) -> ServedModel | None:
        """Stop routing to a version; -> it (to be drained), or None if it was not served."""
        versions = self._models.get(name, {})
        old = versions.pop(version, None)
        if not versions:
            self._models.pop(name, None)
        if old is not None:
            self.absent[(name, version)] = why
        return old

    @property
    def policy(self) -> Policy:
        return scheduling_policy(self.settings, self.serving.device)

    @property
    def engine_spec(self) -> EngineSpec:
        return engine_spec(self.settings, self.serving.device)

    def _check_device(self, runtime: CascadeRuntime) -> None:
        s = self.settings
        if self.serving.device.cuda and not runtime.on_cuda:
            if s.device == "cuda":
                raise RuntimeError(f"device 'cuda' asked for, but onnxruntime could not create a CUDA session for "
                                   f"{runtime.path} (it fell back to the CPU); check the CUDA and cuDNN libraries")
            log.warning("CUDA execution provider failed for %s; serving it on CPU", runtime.path)

    def all(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def get(self, name: str, version: str | int | None = None) -> ServedModel:
        versions = self._models.get(name)
        if not versions:
            why = self.absent.get((name, None))
            if why:
                raise not_found(f"model {name!r} is not served: {why}")
            raise not_found(f"no model {name!r} (served: {', '.join(self.names()) or 'none'})")
        if version is None or version == "":
            return versions[max(versions)]
        try:
            v = int(version)
        except (TypeError, ValueError):
            v = None
        if v not in versions:
            why = self.absent.get((name, v))
            if why:
                raise not_found(f"model {name!r} version {v} is not served: {why} (versions: {sorted(versions)})")
            raise not_found(f"model {name!r} has no version {version!r} (versions: {sorted(versions)})")
        return versions[v]
