"""Per-stage re-batching against request-level batching and no batching, served, measured with wrk.

    python bench/serve_schedulers.py [--concurrency 64] [--duration 10] [--thresholds calibrated,0.999]

For each scheduler (RESKD_SCHEDULER = stage | request | none) a fresh `reskd serve` on the bundled models takes
single-image requests (raw PNG bodies cycling through --images real Fashion-MNIST test images) from
`wrk -t2 -c{concurrency}` on loopback. A threshold other than "calibrated" sends more images to later stages, where
re-batching has survivors to merge. Prints requests/s, p50/p99, the stage-1 batch sizes seen in /metrics, and the
ratios against the per-stage scheduler; with --out, the results as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, metric, scrape  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def write_images(folder: Path, n: int) -> Path:
    pixels = np.frombuffer(gzip.open(FMNIST).read()[16:], np.uint8).reshape(-1, 28, 28)[:n]
    paths = []
    for i, img in enumerate(pixels):
        p = folder / f"{i}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    listing = folder / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def run_wrk(url: str, listing: Path, concurrency: int, duration: int) -> dict:
    out = subprocess.run(["wrk", "-t2", f"-c{concurrency}", f"-d{duration}s", "--latency", "-s",
                          str(ROOT / "bench/wrk/post_images.lua"), url], capture_output=True, text=True,
                         env=dict(os.environ, IMAGE_LIST=str(listing)), timeout=duration + 60)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not line:
        raise RuntimeError(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[-1])
    r["requests_per_s"] = r["requests"] / r["duration_s"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--thresholds", default="calibrated,0.999")
    ap.add_argument("--schedulers", default="stage,request,none")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
               "concurrency": args.concurrency, "duration_s": args.duration, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        listing = write_images(Path(tmp), args.images)
        for threshold in args.thresholds.split(","):
            query = "" if threshold == "calibrated" else f"?threshold={threshold}"
            for scheduler in args.schedulers.split(","):
                server = ServerProcess(scheduler=scheduler, log_level="warning")
                try:
                    r = run_wrk(f"{server.url}/v1/models/fashion-mnist/classify{query}", listing,
                                args.concurrency, args.duration)
                    with server.client() as c:
                        m = scrape(c)
                    labels = {"model": "fashion-mnist", "version": "1"}
                    for s in ("0", "1", "2"):
                        n = metric(m, "reskd_batch_size_count", stage=s, **labels)
                        r[f"stage{s}_mean_batch"] = metric(m, "reskd_batch_size_sum", stage=s, **labels) / n if n else 0
                    r["exits"] = [metric(m, "reskd_exits_total", stage=s, **labels) for s in ("0", "1", "2")]
                finally:
                    server.stop()
                results["runs"][f"{threshold}/{scheduler}"] = r
                print(json.dumps({f"{threshold}/{scheduler}": r}), flush=True)
    print("\nthreshold    scheduler  requests/s   p50 ms   p99 ms  stage-0/1/2 mean batch   vs stage")
    for key, r in results["runs"].items():
        threshold, scheduler = key.split("/")
        base = results["runs"].get(f"{threshold}/stage")
        ratio = base["requests_per_s"] / r["requests_per_s"] if base else float("nan")
        print(f"{threshold:<12} {scheduler:<9} {r['requests_per_s']:>10.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
              f"  {r['stage0_mean_batch']:>6.1f} {r['stage1_mean_batch']:>5.1f} {r['stage2_mean_batch']:>5.1f}"
              f"        {ratio:>5.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
