"""Accuracy against compute on the real Fashion-MNIST test set, through the cascade runtime (what is served).

    python bench/accuracy_compute.py [--bootstrap 2000] [--plot docs/benchmarks/accuracy_compute.png]

Rows: the teacher; the student alone; each cumulative cascade depth (every sample through stages 0..k); the
adaptive cascade at its calibrated thresholds (chosen on validation by `reskd export`); the KD single-model grid
(bundled one-stage models). The adaptive curve sweeps one threshold for all exits on the test set: it shows the
trade-off, it is not how thresholds are chosen. FLOPs = 2 x MACs per image (torch.utils.flop_counter at batch 1,
from the manifests). Intervals: 95% bootstrap over test images; differences are paired.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from common import CASCADE, KD_MODELS, MODELS, TEACHER, machine, test_set
from reskd.runtime import CascadeRuntime


def bootstrap(correct: np.ndarray, reps: int, rng) -> tuple[float, float]:
    idx = rng.integers(0, len(correct), size=(reps, len(correct)))
    means = correct[idx].mean(1)
    return float(np.percentile(means, 2.5) * 100), float(np.percentile(means, 97.5) * 100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--plot", default=str(MODELS.parent / "docs/benchmarks/accuracy_compute.png"))
    ap.add_argument("--json")
    args = ap.parse_args()
    _, images, labels = test_set()
    rng = np.random.default_rng(0)
    cascade = CascadeRuntime(MODELS / CASCADE / "1")
    teacher_flops = cascade.manifest.teacher.flops
    rows = {}  # name -> (correct [N] bool, mean FLOPs)

    def add(name, result):
        rows[name] = ((result.class_id == labels), float(result.flops.mean()), result)

    add("teacher resnet20", CascadeRuntime(MODELS / TEACHER / "1").run(images))
    for k in range(cascade.num_stages):
        label = "student alone (stage 0)" if k == 0 else f"cascade stages 0..{k}, every image"
        add(label, cascade.run(images, max_stage=k, early_exit=False))
    add("adaptive (calibrated thresholds)", cascade.run(images))
    for name in KD_MODELS:
        add(f"KD {name.removeprefix('fashion-mnist-kd-')}", CascadeRuntime(MODELS / name / "1").run(images))

    print(f"machine: {machine()}; {len(labels)} test images; FLOPs = 2 x MACs per image")
    print(f"{'model':<36} {'FLOPs':>12} {'% teacher':>9}  accuracy % [95% CI]")
    table = []
    for name, (correct, flops, _) in rows.items():
        lo, hi = bootstrap(correct, args.bootstrap, rng)
        acc = correct.mean() * 100
        table.append({"model": name, "flops": flops, "pct_teacher": 100 * flops / teacher_flops, "accuracy": acc,
                      "ci": [lo, hi]})
        print(f"{name:<36} {flops:>12,.0f} {100 * flops / teacher_flops:>9.2f}  {acc:.2f} [{lo:.2f}, {hi:.2f}]")
    exits = np.bincount(rows["adaptive (calibrated thresholds)"][2].exit_stage, minlength=cascade.num_stages)
    print(f"adaptive exits per stage: {exits.tolist()}; thresholds {cascade.manifest.exit.thresholds}")

    print("\npaired differences (percentage points, 95% bootstrap CI):")
    adaptive = rows["adaptive (calibrated thresholds)"][0].astype(float)
    diffs = []
    for other in ("teacher resnet20", "student alone (stage 0)", f"cascade stages 0..{cascade.num_stages - 1}, "
                  "every image", *(f"KD {n.removeprefix('fashion-mnist-kd-')}" for n in KD_MODELS)):
        d = adaptive - rows[other][0].astype(float)
        idx = rng.integers(0, len(d), size=(args.bootstrap, len(d)))
        means = d[idx].mean(1) * 100
        lo, hi = np.percentile(means, [2.5, 97.5])
        diffs.append({"a": "adaptive", "b": other, "diff": d.mean() * 100, "ci": [float(lo), float(hi)]})
        print(f"  adaptive - {other:<34} {d.mean() * 100:+.2f} [{lo:+.2f}, {hi:+.2f}]")

    curve = []
    for t in [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0]:
        r = cascade.run(images, threshold=t)
        curve.append({"threshold": t, "pct_teacher": 100 * r.flops.mean() / teacher_flops,
                      "accuracy": float((r.class_id == labels).mean() * 100)})
    print("\nadaptive curve (one threshold for every exit, swept on the test set):")
    for p in curve:
        print(f"  t={p['threshold']:<7} {p['pct_teacher']:6.2f}% of teacher FLOPs  {p['accuracy']:.2f}%")

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot([p["pct_teacher"] for p in curve], [p["accuracy"] for p in curve], "-o", ms=3,
                label="adaptive cascade (threshold sweep)")
        for row in table:
            ax.errorbar(row["pct_teacher"], row["accuracy"], yerr=[[row["accuracy"] - row["ci"][0]],
                                                                  [row["ci"][1] - row["accuracy"]]], fmt="s", ms=5,
                        capsize=3, label=row["model"])
        ax.set_xscale("log")
        ax.set_xlabel("% of teacher FLOPs per image (log)")
        ax.set_ylabel("test accuracy %")
        ax.set_title("Fashion-MNIST test set, bundled models, through the runtime")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "table": table, "differences": diffs, "curve": curve,
                       "exits": exits.tolist()}, f, indent=1)


if __name__ == "__main__":
    main()
