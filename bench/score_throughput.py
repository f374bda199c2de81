"""Throughput of `reskd score` against the raw cascade runtime, on real Fashion-MNIST test images written as PNG.

    .venv/bin/python bench/score_throughput.py [--n 5000] [--batch-size 512] [--engines local,ray]

Raw runtime: CascadeRuntime.run on tensors decoded beforehand (no file reading, decoding or output), in batches of
--batch-size: the ceiling for the local engine. Local and Ray: the whole job, from PNG files to the output file
(Parquet), worker start-up included; Ray's own start-up (ray.init) is timed apart. Each figure is the best of
--repeats runs. Results and the machine are printed at the end (docs/scoring.md quotes them).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from reskd.manifest import ModelRepository
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from reskd.scoring import ScoreOptions, score

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_pngs(folder: Path, n: int) -> list[Path]:
    """The first n test images as PNG files, and labels.csv (path,label) for the summary's accuracy."""
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:16 + n * 784], np.uint8).reshape(n, 28, 28)
    with gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:8 + n], np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for path, img, y in zip(paths, images, labels):
            if not path.exists():
                Image.fromarray(img).save(path)
            w.writerow([path.name, int(y)])
    return paths


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(ROOT / "models"))
    ap.add_argument("--model", default="fashion-mnist")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--workers", type=int, help="local engine decode processes (default: the engine's)")
    ap.add_argument("--threads", type=int, help="local engine onnxruntime threads (default: the engine's)")
    ap.add_argument("--actors", type=int, default=2, help="Ray actor pool size")
    ap.add_argument("--work", default="/tmp/reskd-score-bench", help="folder for the PNGs and outputs")
    args = ap.parse_args()

    work = Path(args.work)
    images = work / f"png-{args.n}"
    paths = write_pngs(images, args.n)
    version_dir, manifest = ModelRepository(args.repo).load(args.model)
    runtime = CascadeRuntime(version_dir)
    x = np.stack([preprocess(p.read_bytes(), manifest.input) for p in paths])
    runtime.run(x[:args.batch_size])  # warm-up

    def raw():
        for i in range(0, len(x), args.batch_size):
            runtime.run(x[i:i + args.batch_size])

    figures = {"raw runtime (pre-decoded tensors)": args.n / best(raw, args.repeats)}

    def job(engine: str, **kw):
        out = work / f"scores-{engine}.parquet"
        shutil.rmtree(work / f"{out.name}.parts", ignore_errors=True)
        summary = score(ScoreOptions(repo=args.repo, model=args.model, inputs=[str(images)], out=str(out),
                                     engine=engine, labels=str(images / "labels.csv"),
                                     batch_size=args.batch_size, progress=False, **kw))
        assert summary.images == args.n and summary.failures == 0
        return summary

    engines = args.engines.split(",")
    if "local" in engines:
        figures["local engine (PNG files -> Parquet)"] = args.n / best(
            lambda: job("local", workers=args.workers, threads=args.threads), args.repeats)
        print("\n".join(job("local", workers=args.workers, threads=args.threads).lines()))
    if "ray" in engines:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        figures["ray.init (local instance), seconds"] = time.perf_counter() - start
        figures[f"ray engine, {args.actors} actors (PNG files -> Parquet)"] = args.n / best(
            lambda: job("ray", actors=args.actors), args.repeats)
        ray.shutdown()

    print(f"\n{args.model}, {args.n} Fashion-MNIST test PNGs, batch size {args.batch_size}, best of {args.repeats}; "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), no GPU used")
    for name, value in figures.items():
        print(f"  {name:48s} {value:10.1f}" + ("" if "seconds" in name else " images/s"))
    raw_rate = figures["raw runtime (pre-decoded tensors)"]
    for name, value in figures.items():
        if "engine" in name:
            print(f"  {name.split(' (')[0]} / raw runtime: {100 * value / raw_rate:.0f}%")


if __name__ == "__main__":
    main()
