"""In-process throughput of the cascade runtime: images/s at batch 1, 32 and 256 for the teacher, the full cascade
(every image through every stage), the adaptive cascade, and the KD single models; and how much of the compute
saving turns into speed (time ratio / compute ratio against the teacher).

    python bench/inprocess_throughput.py [--device cpu|cuda] [--seconds 3] [--batches 1,32,256]
                                         [--cascades fashion-mnist:1] [--teacher fashion-mnist-teacher:1] [--no-kd]

Versions are named explicitly (NAME:VERSION), so a newer bundled version does not change what a figure means;
several cascades (e.g. a ResKD one and a cascade of independent models) are timed in one run.

All sessions share one onnxruntime thread pool of one thread per core, as `reskd serve` runs them
(reskd.device.Device, shared_pool). Inputs cycle through the 10k real test images, so the adaptive cascade's exits are
the real ones. Each figure is the best of 3 timed runs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import KD_MODELS, machine, open_version, test_set
from reskd.device import Device


def rate(fn, images: np.ndarray, batch: int, seconds: float) -> float:
    starts = range(0, len(images) - batch + 1, batch)
    for s in list(starts)[:3]:
        fn(images[s:s + batch])
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            for s in starts:
                fn(images[s:s + batch])
                n += batch
                if n >= 2000 and time.perf_counter() - t0 >= seconds / 3:
                    break
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--cascades", default="fashion-mnist:1", help="comma-separated NAME:VERSION")
    ap.add_argument("--teacher", default="fashion-mnist-teacher:1", help="NAME:VERSION")
    ap.add_argument("--no-kd", action="store_true", help="leave out the bundled KD single models")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = Device.resolve(args.device, shared_pool=True)
    _, images, labels = test_set()
    teacher = open_version(args.teacher, device)
    t_flops = float(teacher.cum_flops[-1])
    runs = {"teacher": (teacher.run, t_flops, float((teacher.run(images).class_id == labels).mean()))}
    several = "," in args.cascades
    for ref in args.cascades.split(","):
        cascade = open_version(ref, device)
        adaptive = cascade.run(images)
        full = cascade.run(images, early_exit=False)
        tag = f"{ref} " if several else ""
        runs[f"{tag}full cascade"] = (lambda x, c=cascade: c.run(x, early_exit=False), float(cascade.cum_flops[-1]),
                                      float((full.class_id == labels).mean()))
        runs[f"{tag}adaptive cascade"] = (cascade.run, float(adaptive.flops.mean()),
                                          float((adaptive.class_id == labels).mean()))
        runs[f"{tag}stage 0 alone"] = (lambda x, c=cascade: c.run(x, max_stage=0), float(cascade.cum_flops[0]),
                                       float((cascade.run(images, max_stage=0).class_id == labels).mean()))
    for name in () if args.no_kd else KD_MODELS:
        rt = open_version(f"{name}:1", device)
        runs[f"KD {name.removeprefix('fashion-mnist-kd-')}"] = (rt.run, float(rt.cum_flops[-1]),
                                                               float((rt.run(images).class_id == labels).mean()))
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {machine()}; device {args.device}; shared onnxruntime pool; best of 3")
    width = max(32, *(len(n) + 1 for n in runs))
    print(f"{'model':<{width}} {'acc %':>6} {'% FLOPs':>8}"
          + "".join(f" {'b' + str(b) + ' img/s':>12}" for b in batches)
          + "  speed-up vs teacher at b" + str(batches[-1]) + " (compute ratio)")
    results = {}
    for name, (fn, flops, acc) in runs.items():
        results[name] = {"accuracy": acc, "flops": flops,
                         "images_per_s": {b: rate(fn, images, b, args.seconds) for b in batches}}
    t_rate = results["teacher"]["images_per_s"]
    for name, r in results.items():
        last = batches[-1]
        speed = r["images_per_s"][last] / t_rate[last]
        compute = t_flops / r["flops"]
        r["speedup_vs_teacher"] = {b: r["images_per_s"][b] / t_rate[b] for b in batches}
        r["compute_ratio"] = compute
        acc = f"{100 * r['accuracy']:.2f}" if r["accuracy"] is not None else "-"
        print(f"{name:<{width}} {acc:>6} {100 * r['flops'] / t_flops:>8.2f}"
              + "".join(f" {r['images_per_s'][b]:>12,.0f}" for b in batches)
              + f"  {speed:.2f}x ({compute:.1f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "device": args.device, "cascades": args.cascades,
                       "teacher": args.teacher, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
