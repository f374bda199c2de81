"""The local engine: worker processes read and decode batches of files while this process runs the cascade on the
previous ones, at large batch sizes.

Why processes: decoding a small image is mostly Python work in Pillow (header parsing), which threads would
serialise on the GIL; onnxruntime releases the GIL and uses its own threads. Workers send uint8 pixels (a quarter
of the float32 bytes). At most 2 batches per worker are in flight, so memory stays bounded whatever the input size.
Results come back in input order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from reskd.runtime import CascadeRuntime, default_providers

from .batch import classify, decode_files


def default_workers() -> int:
    """One decode worker per core but one: the cascade's threads need the other."""
    return max(1, (os.cpu_count() or 2) - 1)


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # Busy-waiting onnxruntime threads would take the cores the decode workers need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class LocalEngine:
    def __init__(self, version_dir: Path, *, batch_size: int = 512, workers: int | None = None,
                 threads: int | None = None, device: str = "auto"):
        self.runtime = CascadeRuntime(version_dir, providers=default_providers(device),
                                      session_options=session_options(threads))
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers

    def score(self, paths: list[str], indices: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Yield result batches (batch.classify's columns) covering `indices`, in order."""
        spec = self.runtime.manifest.input
        chunks = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.workers == 0:
            for chunk in chunks:
                yield classify(self.runtime, chunk, *decode_files([paths[i] for i in chunk], spec))
            return
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            queue: deque = deque()
            todo = iter(chunks)

            def submit() -> None:
                chunk = next(todo, None)
                if chunk is not None:
                    queue.append((chunk, pool.submit(decode_files, [paths[i] for i in chunk], spec)))

            for _ in range(2 * self.workers):
                submit()
            while queue:
                chunk, future = queue.popleft()
                pixels, errors = future.result()
                submit()
                yield classify(self.runtime, chunk, pixels, errors)
