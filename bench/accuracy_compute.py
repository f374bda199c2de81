"""Accuracy against compute on the real Fashion-MNIST test set, through the cascade runtime (what is served).

    python bench/accuracy_compute.py [--cascades fashion-mnist:1] [--teacher fashion-mnist-teacher:1]
                                     [--kd-models fashion-mnist-kd-resnet8:1,fashion-mnist-kd-resnet14:1]
                                     [--bootstrap 2000] [--plot docs/benchmarks/accuracy_compute.png]

Every version is named explicitly (NAME:VERSION), so a newer bundled version does not change what a figure
means. Rows: the teacher; for each cascade its first stage alone, each cumulative depth (every sample through
stages 0..k, combined as its manifest says: summed for ResKD, the last stage's logits for independent models) and
the adaptive cascade at its calibrated thresholds (chosen on validation by `reskd export`); the KD single-model
grid (bundled one-stage models, distilled from the teacher of the first bundled versions: `--kd-models ""` leaves
them out; an independent cascade's "stages 0..k" rows are its own KD models alone). The adaptive curves sweep one
threshold for all exits on the test set: they show the trade-off, they are not how thresholds are chosen.
FLOPs = 2 x MACs per image (torch.utils.flop_counter at batch 1, from the manifests). Intervals: 95% bootstrap
over test images; differences are paired.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from common import KD_MODELS, MODELS, machine, open_version, test_set


def bootstrap(correct: np.ndarray, reps: int, rng) -> tuple[float, float]:
    idx = rng.integers(0, len(correct), size=(reps, len(correct)))
    means = correct[idx].mean(1)
    return float(np.percentile(means, 2.5) * 100), float(np.percentile(means, 97.5) * 100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cascades", default="fashion-mnist:1", help="comma-separated NAME:VERSION")
    ap.add_argument("--teacher", default="fashion-mnist-teacher:1", help="NAME:VERSION")
    ap.add_argument("--kd-models", default=",".join(f"{name}:1" for name in KD_MODELS),
                    help="comma-separated NAME:VERSION of one-stage KD models to compare with; empty for none")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--plot", default=str(MODELS.parent / "docs/benchmarks/accuracy_compute.png"))
    ap.add_argument("--json")
    args = ap.parse_args()
    _, images, labels = test_set()
    rng = np.random.default_rng(0)
    cascades = {ref: open_version(ref) for ref in args.cascades.split(",")}
    teacher = open_version(args.teacher)
    teacher_flops = teacher.stage_flops[0]
    for ref, rt in cascades.items():
        if rt.manifest.teacher.flops != teacher_flops:
            raise SystemExit(f"{ref} was measured against another teacher ({rt.manifest.teacher.flops} FLOPs)")
    rows = {}  # name -> (correct [N] bool, mean FLOPs, result)

    def add(name, result):
        rows[name] = ((result.class_id == labels), float(result.flops.mean()), result)

    add(f"teacher {args.teacher}", teacher.run(images))
    for ref, rt in cascades.items():
        kind = rt.manifest.combine
        for k in range(rt.num_stages):
            label = f"{ref} stage 0 alone" if k == 0 else f"{ref} stages 0..{k} ({kind}), every image"
            add(label, rt.run(images, max_stage=k, early_exit=False))
        add(f"{ref} adaptive (calibrated)", rt.run(images))
    kd_rows = []
    for ref in filter(None, args.kd_models.split(",")):
        kd_rows.append(f"KD {ref.removeprefix('fashion-mnist-kd-')}")
        add(kd_rows[-1], open_version(ref).run(images))

    print(f"machine: {machine()}; {len(labels)} test images; FLOPs = 2 x MACs per image")
    print(f"{'model':<58} {'FLOPs':>12} {'% teacher':>9}  accuracy % [95% CI]")
    table = []
    for name, (correct, flops, _) in rows.items():
        lo, hi = bootstrap(correct, args.bootstrap, rng)
        acc = correct.mean() * 100
        table.append({"model": name, "flops": flops, "pct_teacher": 100 * flops / teacher_flops, "accuracy": acc,
                      "ci": [lo, hi]})
        print(f"{name:<58} {flops:>12,.0f} {100 * flops / teacher_flops:>9.2f}  {acc:.2f} [{lo:.2f}, {hi:.2f}]")
    exits = {}
    for ref, rt in cascades.items():
        exits[ref] = np.bincount(rows[f"{ref} adaptive (calibrated)"][2].exit_stage, minlength=rt.num_stages).tolist()
        print(f"{ref} ({rt.manifest.combine}) adaptive exits per stage: {exits[ref]}; thresholds "
              f"{rt.manifest.exit.thresholds}")

    print("\npaired differences (percentage points, 95% bootstrap CI):")
    diffs = []

    def diff(a: str, b: str) -> None:
        d = rows[a][0].astype(float) - rows[b][0].astype(float)
        idx = rng.integers(0, len(d), size=(args.bootstrap, len(d)))
        lo, hi = np.percentile(d[idx].mean(1) * 100, [2.5, 97.5])
        diffs.append({"a": a, "b": b, "diff": d.mean() * 100, "ci": [float(lo), float(hi)]})
        print(f"  {a} - {b}: {d.mean() * 100:+.2f} [{lo:+.2f}, {hi:+.2f}]")

    refs = list(cascades)
    for ref, rt in cascades.items():
        adaptive = f"{ref} adaptive (calibrated)"
        for other in (f"teacher {args.teacher}", f"{ref} stage 0 alone",
                      f"{ref} stages 0..{rt.num_stages - 1} ({rt.manifest.combine}), every image",
                      *kd_rows):
            diff(adaptive, other)
    for i, a in enumerate(refs):
        for b in refs[i + 1:]:
            diff(f"{a} adaptive (calibrated)", f"{b} adaptive (calibrated)")

    curves = {}
    for ref, rt in cascades.items():
        curve = curves[ref] = []
        for t in [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0]:
            r = rt.run(images, threshold=t)
            curve.append({"threshold": t, "pct_teacher": 100 * r.flops.mean() / teacher_flops,
                          "accuracy": float((r.class_id == labels).mean() * 100)})
        print(f"\n{ref} adaptive curve (one threshold for every exit, swept on the test set):")
        for p in curve:
            print(f"  t={p['threshold']:<7} {p['pct_teacher']:6.2f}% of teacher FLOPs  {p['accuracy']:.2f}%")

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 5))
        for ref, curve in curves.items():
            ax.plot([p["pct_teacher"] for p in curve], [p["accuracy"] for p in curve], "-o", ms=3,
                    label=f"{ref} ({cascades[ref].manifest.combine}), threshold sweep")
        for row in table:
            ax.errorbar(row["pct_teacher"], row["accuracy"], yerr=[[row["accuracy"] - row["ci"][0]],
                                                                  [row["ci"][1] - row["accuracy"]]], fmt="s", ms=5,
                        capsize=3, label=row["model"])
        ax.set_xscale("log")
        ax.set_xlabel("% of teacher FLOPs per image (log)")
        ax.set_ylabel("test accuracy %")
        ax.set_title("Fashion-MNIST test set, bundled models, through the runtime")
        ax.legend(fontsize=6, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "cascades": refs, "teacher": args.teacher, "table": table,
                       "differences": diffs, "curves": curves, "exits": exits}, f, indent=1)


if __name__ == "__main__":
    main()
