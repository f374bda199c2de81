"""The per-batch work both engines share, so local and Ray give the same rows.

decode_files runs where decoding is parallel (worker processes, Ray tasks): a file that cannot be read or decoded
yields an error message, never an exception. classify runs where the cascade lives (the engine's main process, a
worker, a Ray actor): it normalises the whole batch at once and runs the runtime on the images that decoded, then
(--audit) the audit model on those answered before the last stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from reskd.manifest import InputSpec
from reskd.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_pixels, normalise

if TYPE_CHECKING:  # decode workers never load onnxruntime
    from reskd.runtime import CascadeRuntime

    from .audit import AuditRunner


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def decode_files(paths: list[str], spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[np.ndarray, list[str]]:
    """-> uint8 pixels [N, C, H, W] (zeros where it failed) and one error message per path ('' when it decoded)."""
    pixels = np.zeros((len(paths), spec.channels, spec.height, spec.width), dtype=np.uint8)
    errors = [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            pixels[i] = decode_pixels(read_file(path), spec, max_pixels)
        except ImageError as err:
            errors[i] = str(err)
        except OSError as err:
            errors[i] = f"cannot read the file: {err.strerror or err}"
        except Exception as err:  # noqa: BLE001 - an image library bug on one odd file must not stop a million-image job
            errors[i] = f"cannot decode the image: {type(err).__name__}: {err}"
    return pixels, errors


def classify(runtime: CascadeRuntime, index: np.ndarray, pixels: np.ndarray, errors,
             audit: AuditRunner | None = None) -> dict[str, np.ndarray]:
    """One result per input: class_id, confidence, exit_stage, flops, score0 (-1 / NaN / -1 / 0 / NaN where `error`
    is set); with `audit`, audit_class_id: the audit model's class for the answers given before the last stage (-1
    for the others)."""
    n = len(index)
    ok = np.asarray([not e for e in errors], dtype=bool)
    out = {"index": np.asarray(index, dtype=np.int64),
           "class_id": np.full(n, -1, dtype=np.int64),
           "confidence": np.full(n, np.nan, dtype=np.float64),
           "exit_stage": np.full(n, -1, dtype=np.int32),
           "flops": np.zeros(n, dtype=np.int64),
           "score0": np.full(n, np.nan, dtype=np.float64),
           "error": np.asarray([str(e) for e in errors], dtype=object)}
    if audit is not None:
        out["audit_class_id"] = np.full(n, -1, dtype=np.int64)
    if ok.any():
        result = runtime.run(normalise(pixels[ok], runtime.manifest.input))
        out["class_id"][ok] = result.class_id
        out["confidence"][ok] = result.confidence
        out["exit_stage"][ok] = result.exit_stage
        out["flops"][ok] = result.flops
        if result.score0 is not None:
            out["score0"][ok] = result.score0
        if audit is not None:
            early = np.flatnonzero(ok)[result.exit_stage < audit.plan.last_stage]
            if len(early):
                out["audit_class_id"][early] = audit.classes(pixels[early])
    return out
