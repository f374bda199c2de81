"""The cascade runtime: onnxruntime + numpy, no torch. Calibration, serving, batch scoring and benchmarks all
execute a model repository version through this one class, so what is calibrated is exactly what is served.

A batch goes through the stages in order; each stage runs only on the samples still undecided. After stage s the
running logits are the sum of the stage outputs so far; a sample leaves when its confidence (reskd.exit_policy)
reaches the stage's threshold, or when it reaches max_stage; the last stage always answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .exit_policy import confidence
from .manifest import Manifest, load_manifest


StageHook = Callable[[int, int, float], None]


@dataclass
class CascadeResult:
    logits: np.ndarray  # float32 [N, classes]: running logits at the exit stage (summed in float64)
    class_id: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float64 [N], the manifest's exit measure at the exit stage
    exit_stage: np.ndarray  # int32 [N]
    flops: np.ndarray  # int64 [N]: sum of the FLOPs of the stages each sample ran

    def __len__(self) -> int:
        return len(self.class_id)


_shared_threads: int | None = None


def share_threads(threads: int = 0) -> bool:
    """Make every CascadeRuntime session created afterwards in this process share one onnxruntime intra-op thread
    pool of `threads` threads (0: one per core). A cascade has a session per stage; with a pool each, the pools
    of the stages just run keep spinning and steal the cores from the next stage (measured on 2 cores: the
    adaptive cascade at batch 256 goes from 13.6k to 25.2k images/s). Call it once, before any session exists
    (a server or benchmark process does); afterwards every session must be made with options from
    `cascade_session_options`. Returns False where this onnxruntime build has no global pools."""
    global _shared_threads
    if _shared_threads is not None:
        return True
    setter = getattr(ort.capi._pybind_state, "set_global_thread_pool_sizes", None)
    if setter is None:
        return False
    setter(threads, 1)
    _shared_threads = threads
    return True


def cascade_session_options(options: ort.SessionOptions | None = None, *, stages: int = 1) -> ort.SessionOptions:
    """Options for a cascade's sessions: the shared pool when share_threads was called; otherwise per-session
    pools, which must not spin between calls when several stages take turns on the same cores."""
    options = options or ort.SessionOptions()
    if _shared_threads is not None:
        options.use_per_session_threads = False
    elif stages > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def default_providers(device: str = "auto", cudnn_conv_algo_search: str = "HEURISTIC") -> list:
    """CUDA first when asked for or ("auto") offered, else CPU. cuDNN's default EXHAUSTIVE search benchmarks every
    new input shape, and early exit makes later stages' batch sizes vary: HEURISTIC unless shapes are bucketed."""
    available = ort.get_available_providers()
    cuda = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": cudnn_conv_algo_search}), "CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device 'cuda' asked for, but onnxruntime offers only {available}")
    elif device != "auto" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels this way
    return cuda


class CascadeRuntime:
    def __init__(self, version_dir: str | Path, *, providers: list[str] | None = None,
                 session_options: ort.SessionOptions | None = None, check_folder_name: bool = True):
        self.path = Path(version_dir)
        self.manifest: Manifest = load_manifest(self.path, check_folder_name=check_folder_name)
        self.providers = providers or default_providers()
        self.session_options = cascade_session_options(session_options, stages=len(self.manifest.stages))
        self.sessions = [ort.InferenceSession(str(self.path / s.file), sess_options=self.session_options,
                                              providers=self.providers) for s in self.manifest.stages]
        self.stage_flops = np.asarray(self.manifest.stage_flops, dtype=np.int64)
        self.cum_flops = np.cumsum(self.stage_flops)
        m = self.manifest.input
        self.input_shape = (m.channels, m.height, m.width)
        self.num_classes = len(self.manifest.labels)

    @property
    def num_stages(self) -> int:
        return len(self.sessions)

    def stage_logits(self, stage: int, images: np.ndarray) -> np.ndarray:
        return self.sessions[stage].run(["logits"], {"images": images})[0]

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(f"images must be [N, {', '.join(map(str, self.input_shape))}], got {list(images.shape)}")
        if images.dtype != np.float32:
            images = images.astype(np.float32)
        return np.ascontiguousarray(images)

    def thresholds_for(self, threshold: float | None) -> np.ndarray:
        if threshold is None:
            return np.asarray(self.manifest.exit.thresholds, dtype=np.float64)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        return np.full(self.num_stages - 1, threshold, dtype=np.float64)

    def check_max_stage(self, max_stage: int | None) -> int:
        last = self.num_stages - 1 if max_stage is None else int(max_stage)
        if not 0 <= last < self.num_stages:
            raise ValueError(f"max_stage must be between 0 and {self.num_stages - 1}, got {max_stage}")
        return last

    def run(self, images: np.ndarray, *, threshold: float | None | Sequence[float | None] = None,
            max_stage: int | None | Sequence[int | None] = None, early_exit: bool = True,
            on_stage: StageHook | None = None) -> CascadeResult:
        """Classify a batch. threshold replaces every calibrated threshold; max_stage stops there at the latest;
        both may be given per sample (a sequence of N values, None meaning the manifest's), so one batch can hold
        requests with different settings. early_exit=False runs every stage (up to max_stage) on every sample.
        on_stage(stage, samples, seconds) is called after each stage that ran (for metrics)."""
        images = self._check(images)
        n = len(images)
        thresholds, last = self._per_sample(n, threshold, max_stage)
        # float64 sums in stage order, as all_stage_logits (calibration) does: identical exit decisions.
        running = np.zeros((n, self.num_classes), dtype=np.float64)
        conf = np.zeros(n, dtype=np.float64)
        exit_stage = last.copy()
        active = np.arange(n)
        measure = self.manifest.exit.measure
        for s in range(int(last.max(initial=0)) + 1):
            if len(active) == 0:
                break
            batch = images if len(active) == n else images[active]
            start = time.perf_counter()
            running[active] += self.stage_logits(s, batch)
            if on_stage is not None:
                on_stage(s, len(active), time.perf_counter() - start)
            conf[active] = confidence(running[active], measure)
            done = last[active] == s
            if early_exit and s < self.num_stages - 1:
                done |= conf[active] >= thresholds[active, s]
            exit_stage[active[done]] = s
            active = active[~done]
        return CascadeResult(running.astype(np.float32), running.argmax(-1).astype(np.int64), conf, exit_stage,
                             self.cum_flops[exit_stage].astype(np.int64))

    def _per_sample(self, n: int, threshold, max_stage) -> tuple[np.ndarray, np.ndarray]:
        """-> thresholds [N, stages-1] float64 and last stage [N] int32."""
        rows = _each(threshold, n, self.thresholds_for, "thresholds")
        last = _each(max_stage, n, self.check_max_stage, "max_stage values")
        table = np.asarray(rows, dtype=np.float64).reshape(n, self.num_stages - 1)
        return table, np.asarray(last, dtype=np.int32).reshape(n)

    def all_stage_logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Running logits after every stage for every sample: [stages, N, classes] (for calibration)."""
        images = self._check(images)
        out = np.zeros((self.num_stages, len(images), self.num_classes), dtype=np.float64)
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            total = np.zeros((len(chunk), self.num_classes), dtype=np.float64)
            for s in range(self.num_stages):
                total = total + self.stage_logits(s, chunk)
                out[s, i:i + batch_size] = total
        return out


def _each(value, n: int, check, what: str) -> list:
    """A setting given once (None or a scalar) or per sample (a sequence of N), checked, as N values."""
    if value is None or np.isscalar(value):
        return [check(value)] * n
    if len(value) != n:
        raise ValueError(f"{len(value)} {what} for {n} images")
    return [check(v) for v in value]
