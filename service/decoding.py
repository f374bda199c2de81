"""Encoded images -> one float32 batch, in worker threads (never on the event loop). The conversion itself is
reskd.preprocess, the same code batch scoring uses."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import numpy as np

from reskd.manifest import InputSpec
from reskd.preprocess import ImageError, ImageTooLarge, preprocess

from .errors import too_large, unsupported


async def decode_batch(executor: Executor, blobs: list[bytes], names: list[str], spec: InputSpec,
                       max_pixels: int) -> np.ndarray:
    """-> float32 [N, C, H, W]. The first bad image fails the request: 413 for a decompression bomb or an image
    over the pixel limit, 415 for bytes that are not a readable image; the message names the image."""
    loop = asyncio.get_running_loop()
    tasks = [loop.run_in_executor(executor, preprocess, blob, spec, max_pixels) for blob in blobs]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for name, result in zip(names, results):
        if isinstance(result, ImageTooLarge):
            raise too_large(f"{name}: {result}")
        if isinstance(result, ImageError):
            raise unsupported(f"{name}: {result}")
        if isinstance(result, BaseException):
            raise result
    return np.stack(results)
