"""Latency of each stage session by batch size, per provider and cuDNN algorithm search, and of the IO-binding
path (upload, whole block, gather from 1 and 8 blocks). Prints one JSON line per measurement.

    python bench/stage_latency.py [--device cuda|cpu] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from reskd.device import Device
from reskd.runtime import CascadeRuntime
from reskd.engine import EngineSpec, images_part

MODELS = Path(__file__).resolve().parents[1] / "models"
SIZES = [1, 4, 16, 64, 256]


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    ort.set_default_logger_severity(2)  # node placement warnings (nodes falling back to CPU) go to stderr
    searches = ["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] if args.device == "cuda" else ["-"]
    rng = np.random.default_rng(0)
    for name in ("fashion-mnist", "fashion-mnist-teacher"):
        for search in searches:
            device = Device.resolve(args.device, cudnn_conv_algo_search=search)
            rt = CascadeRuntime(MODELS / name / "1", device=device)
            for s in range(rt.num_stages):
                row = {"model": name, "search": search, "stage": s}
                for n in SIZES:
                    x = rng.normal(size=(n, *rt.input_shape)).astype(np.float32)
                    row[f"b{n}_ms"] = round(timed(lambda: rt.stage_logits(s, x), args.repeats), 3)
                print(json.dumps(row), flush=True)
            if name == "fashion-mnist" and search == searches[0]:
                bound = CascadeRuntime(MODELS / name / "1", device=device,
                                       engine=EngineSpec("bound", buckets=tuple(SIZES), max_blocks=8)).engine
                bound.warm_up()
                x = rng.normal(size=(256, *rt.input_shape)).astype(np.float32)
                blocks = [bound.upload(x) for _ in range(8)]
                row = {"bound": True, "search": search,
                       "upload256_ms": round(timed(lambda: bound.upload(x), args.repeats), 3)}
                for s in range(rt.num_stages):
                    row[f"stage{s}_whole256_ms"] = round(timed(
                        lambda: bound.run(s, [images_part(blocks[0], np.arange(256))]), args.repeats), 3)
                    row[f"stage{s}_gather4_from1_ms"] = round(timed(
                        lambda: bound.run(s, [images_part(blocks[0], np.array([3, 9, 27, 81]))]), args.repeats), 3)
                    row[f"stage{s}_gather16_from8_ms"] = round(timed(
                        lambda: bound.run(s, [images_part(b, np.array([1, 2])) for b in blocks]), args.repeats), 3)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
