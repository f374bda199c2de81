"""The local engine: worker processes read and decode batches of files, at large batch sizes, in input order.

- CPU (the default): each worker also holds its own cascade runtime with one onnxruntime thread and classifies the
  batch it decoded; this process only collects rows. Measured on 2 cores (bench/score_throughput.py): one
  onnxruntime thread does ~70% of what two do, and decoding a 28x28 PNG costs ~0.6x of classifying it, so a
  split of cores between decoders and one multi-threaded runtime leaves cores idle, while workers that do both
  keep every core busy.
- CUDA: the GPU runtime lives in this process and the workers only decode (one CUDA context, not one per worker).

Processes rather than threads: decoding a small image is mostly Python work in Pillow (header parsing), which
threads would serialise on the GIL. At most 2 batches per worker are in flight, so memory stays bounded whatever
the number of inputs. --workers 0 does everything in this process (debugging, tiny jobs).

--audit: the audit model lives beside each cascade (in each CPU worker, or in this process).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from reskd.device import Device
from reskd.manifest import InputSpec, load_manifest
from reskd.runtime import CascadeRuntime

from .audit import AuditPlan, AuditRunner
from .batch import classify, decode_files

_worker_runtime: CascadeRuntime | None = None  # a CPU worker's own cascade
_worker_audit: AuditRunner | None = None  # and its audit model (--audit)


def scoring_device(name: str, threads: int | None) -> Device:
    """Busy-waiting onnxruntime threads would take cores from the other processes between batches."""
    return Device.resolve(name, threads=threads or 0, spinning=False)


def _start_worker(version_dir: str | None, threads: int, audit: AuditPlan | None = None) -> None:
    global _worker_runtime, _worker_audit
    if version_dir is not None:
        device = scoring_device("cpu", threads)
        _worker_runtime = CascadeRuntime(version_dir, device=device)
        if audit is not None:
            _worker_audit = AuditRunner(audit, _worker_runtime, device)


def _work(index: np.ndarray, paths: list[str], spec: InputSpec):
    """In a worker: decode, then classify when this worker holds a cascade; else return the pixels."""
    pixels, errors = decode_files(paths, spec)
    if _worker_runtime is not None:
        return classify(_worker_runtime, index, pixels, errors, _worker_audit)
    return pixels, errors


class LocalEngine:
    def __init__(self, version_dir: Path, *, batch_size: int = 512, workers: int | None = None,
                 threads: int | None = None, device: str = "auto", audit: AuditPlan | None = None):
        self.version_dir = Path(version_dir)
        self.spec = load_manifest(self.version_dir).input
        self.batch_size = batch_size
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        resolved = scoring_device(device, threads)
        self.on_cpu = not resolved.cuda
        self.threads = threads
        self.audit_plan = audit
        self.runtime = None  # this process's cascade: GPU, or --workers 0
        self.audit = None  # and its audit model
        if not self.on_cpu or self.workers == 0:
            self.runtime = CascadeRuntime(self.version_dir, device=resolved)
            if audit is not None:
                self.audit = AuditRunner(audit, self.runtime, resolved)
            if not self.on_cpu and workers is None:
                self.workers = max(1, self.workers - 1)  # a core feeds the GPU; an explicit --workers N is N

    def score(self, paths: list[str], indices: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Yield result batches (batch.classify's columns) covering `indices`, in order."""
        chunks = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.workers == 0:
            for chunk in chunks:
                yield classify(self.runtime, chunk, *decode_files([paths[i] for i in chunk], self.spec), self.audit)
            return
        worker_model = str(self.version_dir) if self.on_cpu else None
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # workers fork with numpy, Pillow, onnxruntime imported
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                 initargs=(worker_model, self.threads or 1, self.audit_plan)) as pool:
            queue: deque = deque()
            todo = iter(chunks)

            def submit() -> None:
                chunk = next(todo, None)
                if chunk is not None:
                    queue.append((chunk, pool.submit(_work, chunk, [paths[i] for i in chunk], self.spec)))

            for _ in range(2 * self.workers):
                submit()
            while queue:
                chunk, future = queue.popleft()
                result = future.result()
                submit()
                yield result if isinstance(result, dict) else classify(self.runtime, chunk, *result, self.audit)
