"""The cascade runtime: onnxruntime + numpy, no torch. Calibration, serving, batch scoring and benchmarks all
execute a model repository version through this one class, so what is calibrated is exactly what is served.

A batch goes through the stages in order; each stage runs only on the samples still undecided, and
reskd.cascade decides, after each stage, which samples leave. The stages execute on the version's engine
(reskd.engine: numpy on CPU; fixed device buffers, buckets and CUDA graphs on CUDA).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cascade import CascadeInputError, CascadeResult, CascadeSamples, ExitRule, advance, combine
from .device import Device
from .engine import BoundEngine, EngineSpec, HostEngine, make_engine
from .manifest import Manifest, load_manifest

StageHook = Callable[[int, int, float], None]
log = logging.getLogger("reskd")


class CascadeRuntime:
    def __init__(self, version_dir: str | Path, *, device: Device | None = None, check_folder_name: bool = True,
                 engine: EngineSpec | None = None):
        self.path = Path(version_dir)
        self.manifest: Manifest = load_manifest(self.path, check_folder_name=check_folder_name)
        self.device = device or Device.resolve()
        asked = engine or EngineSpec()
        self.engine_spec = asked.resolve(self.device)
        try:
            self.sessions = self._sessions(bool(self.engine_spec.graphs))
        except Exception as err:  # onnxruntime refuses graphs when a node is not placed on CUDA
            if not self.engine_spec.graphs or asked.graphs:
                raise
            log.warning("CUDA graphs unavailable for %s (%s); running it without", self.path, err)
            self.engine_spec = replace(self.engine_spec, graphs=False)
            self.sessions = self._sessions(False)
        self.stage_flops = np.asarray(self.manifest.stage_flops, dtype=np.int64)
        self.cum_flops = np.cumsum(self.stage_flops)
        m = self.manifest.input
        self.input_shape = (m.channels, m.height, m.width)
        self.num_classes = len(self.manifest.labels)
        self.rule = ExitRule(self.manifest.exit.measure, len(self.manifest.stages))
        self.engine: HostEngine | BoundEngine = make_engine(self.engine_spec, self.device, self.sessions,
                                                           self.input_shape, self.num_classes)

    def _sessions(self, graphs: bool) -> list:
        device = self.device.with_cuda_graphs(graphs)
        stages = self.manifest.stages
        return [device.session(str(self.path / s.file), len(stages)) for s in stages]

    @property
    def num_stages(self) -> int:
        return len(self.sessions)

    @property
    def on_cuda(self) -> bool:
        """Whether the stages really run on CUDA (onnxruntime falls back to CPU when the CUDA libraries fail)."""
        return Device.runs_on_cuda(self.sessions[0])

    def _chunks(self, n: int) -> list[slice]:
        """A batch as the engine takes it: whole on the host engine, at most the largest bucket when bound."""
        return self.engine.buckets.chunks(n) if isinstance(self.engine, BoundEngine) else [slice(0, n)]

    def stage_logits(self, stage: int, images: np.ndarray) -> np.ndarray:
        """One stage's logits for every image (float32 [N, classes]), through the engine."""
        images = self.check_images(images)
        out = []
        with self.engine.lock:
            for chunk in self._chunks(len(images)):
                block = self.engine.stage_block(images[chunk])
                out.append(self.engine.run(stage, [(block, np.arange(chunk.stop - chunk.start))])[0])
        return out[0] if len(out) == 1 else np.concatenate(out)

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise CascadeInputError(f"images must be [N, {', '.join(map(str, self.input_shape))}], got "
                                    f"{list(images.shape)}")
        return np.ascontiguousarray(images, dtype=np.float32)

    def thresholds_for(self, threshold: float | None) -> np.ndarray:
        if threshold is None:
            return np.asarray(self.manifest.exit.thresholds, dtype=np.float64)
        if not 0.0 <= threshold <= 1.0:
            raise CascadeInputError(f"threshold must be between 0 and 1, got {threshold}")
        return np.full(self.num_stages - 1, threshold, dtype=np.float64)

    def check_max_stage(self, max_stage: int | None) -> int:
        last = self.num_stages - 1 if max_stage is None else int(max_stage)
        if not 0 <= last < self.num_stages:
            raise CascadeInputError(f"max_stage must be between 0 and {self.num_stages - 1}, got {max_stage}")
        return last

    def samples(self, n: int, threshold: float | None | Sequence[float | None] = None,
                max_stage: int | None | Sequence[int | None] = None) -> CascadeSamples:
        """n samples' exit settings, checked: threshold replaces every calibrated threshold, max_stage stops there
        at the latest; each given once or per sample (a sequence of n values, None meaning the manifest's)."""
        rows = _each(threshold, n, self.thresholds_for, "thresholds")
        last = _each(max_stage, n, self.check_max_stage, "max_stage values")
        table = np.asarray(rows, dtype=np.float64).reshape(n, self.num_stages - 1)
        return CascadeSamples(table, np.asarray(last, dtype=np.int32).reshape(n), self.num_classes)

    def run(self, images: np.ndarray, *, threshold: float | None | Sequence[float | None] = None,
            max_stage: int | None | Sequence[int | None] = None, early_exit: bool = True,
            on_stage: StageHook | None = None) -> CascadeResult:
        """Classify a batch (settings as in `samples`). early_exit=False runs every stage (up to max_stage) on
        every sample. on_stage(stage, samples, seconds) is called after each stage that ran (for metrics)."""
        images = self.check_images(images)
        n = len(images)
        samples = self.samples(n, threshold, max_stage)
        stages = int(samples.last.max(initial=0)) + 1
        for chunk in self._chunks(n):
            with self.engine.lock:  # a bound engine's staging buffer holds this chunk until its last stage
                block = self.engine.stage_block(images[chunk])
                active = np.arange(chunk.stop - chunk.start)
                for s in range(stages):
                    if len(active) == 0:
                        break
                    start = time.perf_counter()
                    logits, _ = self.engine.run(s, [(block, active)])
                    if on_stage is not None:
                        on_stage(s, len(active), time.perf_counter() - start)
                    (leave,) = advance(self.rule, s, [(samples, chunk.start + active)], logits, early_exit)
                    active = active[~leave]
        return samples.result(self.cum_flops)

    def all_stage_logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Running logits after every stage for every sample: [stages, N, classes] (for calibration)."""
        images = self.check_images(images)
        out = np.zeros((self.num_stages, len(images), self.num_classes), dtype=np.float64)
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            total = np.zeros((len(chunk), self.num_classes), dtype=np.float64)
            for s in range(self.num_stages):
                total = combine(total, self.stage_logits(s, chunk))
                out[s, i:i + batch_size] = total
        return out


def _each(value, n: int, check, what: str) -> list:
    """A setting given once (None or a scalar) or per sample (a sequence of N), checked, as N values."""
    if value is None or np.isscalar(value):
        return [check(value)] * n
    if len(value) != n:
        raise CascadeInputError(f"{len(value)} {what} for {n} images")
    return [check(v) for v in value]
