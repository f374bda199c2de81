"""Where cascades run: onnxruntime providers and session options, decided once per process or engine.

Every session of reskd (the runtime's stages, the server's gather graph, scoring workers, Ray actors, benchmarks)
is made from a Device, so the choices below live in one place:
- CUDA first when asked for or ("auto") offered, else CPU. cuDNN's default EXHAUSTIVE search benchmarks every new
  input shape, and early exit makes later stages' batch sizes vary: HEURISTIC unless shapes are bucketed.
- Threads. A cascade has a session per stage; with a pool each, the pools of the stages just run keep spinning and
  steal the cores from the next stage. A long-lived process (the server, a benchmark) therefore shares one
  process-wide intra-op pool among all its sessions (measured on 2 cores: the adaptive cascade at batch 256 goes
  from 13.6k to 25.2k images/s). Otherwise each session has its own pool, which must not spin between calls when
  several stages or processes take turns on the same cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import onnxruntime as ort

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

_shared_pool_threads: int | None = None


def _share_threads(threads: int) -> bool:
    """Create the process-wide onnxruntime intra-op pool (threads; 0: one per core). It must exist before the
    first session of the process; the first call wins. False where this onnxruntime build has none."""
    global _shared_pool_threads
    if _shared_pool_threads is not None:
        return True
    setter = getattr(ort.capi._pybind_state, "set_global_thread_pool_sizes", None)
    if setter is None:
        return False
    setter(threads, 1)
    _shared_pool_threads = threads
    return True


@dataclass(frozen=True)
class Device:
    kind: Literal["cpu", "cuda"]
    providers: tuple  # what InferenceSession takes; on CUDA the first entry is (CUDA_EP, options)
    threads: int = 0  # intra-op threads of a session's own pool (0: onnxruntime's default, one per core)
    shared_pool: bool = False  # sessions use the process-wide pool instead of their own
    spinning: bool = True  # False: own pools never busy-wait (other sessions or processes share the cores)
    cuda_graphs: bool = False  # CUDA EP captures a graph per gpu_graph_id (reskd.engine's BoundEngine only)

    @classmethod
    def resolve(cls, name: str = "auto", *, cudnn_conv_algo_search: str = "HEURISTIC", threads: int = 0,
                shared_pool: bool = False, spinning: bool = True) -> Device:
        """name: auto (CUDA when this onnxruntime offers it), cpu or cuda (RuntimeError without the CUDA EP).
        shared_pool=True creates the process-wide pool of `threads` threads; call it before any session exists."""
        available = ort.get_available_providers()
        if name == "cuda" and CUDA_EP not in available:
            raise RuntimeError(f"device 'cuda' asked for, but onnxruntime offers only {available}")
        cuda = name in ("cuda", "auto") and CUDA_EP in available
        if cuda:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels this way
            providers = ((CUDA_EP, {"cudnn_conv_algo_search": cudnn_conv_algo_search}), CPU_EP)
        else:
            providers = (CPU_EP,)
        return cls("cuda" if cuda else "cpu", providers, spinning=spinning).with_threads(threads, shared_pool)

    def with_threads(self, threads: int, shared_pool: bool = False) -> Device:
        """The same device with `threads` intra-op threads; shared_pool=True creates the process-wide pool of that
        size (before any session of the process exists) and has every session use it."""
        return replace(self, threads=threads, shared_pool=shared_pool and _share_threads(threads))

    def with_cuda_graphs(self, on: bool = True) -> Device:
        """The same device whose CUDA sessions capture graphs (`enable_cuda_graph`); no effect on CPU."""
        return replace(self, cuda_graphs=on and self.cuda)

    @classmethod
    def cpu(cls, threads: int = 0, spinning: bool = True) -> Device:
        return cls.resolve("cpu", threads=threads, spinning=spinning)

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    def session_options(self, sessions_sharing_cores: int = 1) -> ort.SessionOptions:
        """Options for one session; sessions_sharing_cores: how many sessions take turns on the cores (a cascade's
        stages). Nothing set here is ignored by onnxruntime, so sessions are created without warnings."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.shared_pool:
            options.use_per_session_threads = False  # the pool's size is the process-wide one
            return options
        options.inter_op_num_threads = 1
        if self.threads:
            options.intra_op_num_threads = self.threads
        if not self.spinning or sessions_sharing_cores > 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def session(self, model: str | bytes, sessions_sharing_cores: int = 1) -> ort.InferenceSession:
        """model: an ONNX file's path or serialised bytes."""
        providers = list(self.providers)
        if self.cuda_graphs:
            name, options = providers[0]
            providers[0] = (name, {**options, "enable_cuda_graph": "1"})
        return ort.InferenceSession(model, sess_options=self.session_options(sessions_sharing_cores),
                                    providers=providers)

    @staticmethod
    def runs_on_cuda(session: ort.InferenceSession) -> bool:
        """Whether onnxruntime really placed the session on CUDA (it falls back to CPU when the libraries fail)."""
        return session.get_providers()[0] == CUDA_EP
