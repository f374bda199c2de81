"""The ablation's test figures (docs/ablation.md), computed there from PyTorch logits, reproduced through the
runtime on the bundled ONNX versions, for both cascade kinds.

    python bench/reproduce_ablation.py [--run runs/ablation/head2x0.75-feat-ce+kd-12ep-seed1]
                                       [--sum fashion-mnist:2] [--replace fashion-mnist-independent:1]

Needs the ablation's run directory (`reskd sweep ...`, docs/ablation.md; not in git): its report.json holds the
ablation's figures and thresholds, its logits.npz PyTorch's logits. For each operating point of the report (the
ResKD cascade at its calibrated thresholds and with every stage run; every point of the independent-models
cascade's curve and its point at the ResKD cascade's FLOPs) the runtime runs the real test set at the same
thresholds, and accuracy, mean FLOPs and exits are compared; then each bundled version's own calibration rule is
applied to PyTorch's validation logits as the ablation would, and compared with what the runtime serves. A
difference over 0.05 pt of accuracy fails the script (exit status 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import ROOT, open_version, test_set
from reskd.exit_policy import CascadeScores
from reskd.manifest import ExitSpec
from reskd.runtime import CascadeRuntime

TOLERANCE_PT = 0.05


def at(rt: CascadeRuntime, thresholds, images, labels) -> dict:
    """The runtime's test figures with these per-stage thresholds (instead of the manifest's)."""
    rt.manifest = rt.manifest.model_copy(update={"exit": ExitSpec(measure=rt.manifest.exit.measure,
                                                                  thresholds=[float(t) for t in thresholds])})
    r = rt.run(images)
    return {"accuracy": 100 * float((r.class_id == labels).mean()), "mean_flops": float(r.flops.mean()),
            "exit_counts": np.bincount(r.exit_stage, minlength=rt.num_stages).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs/ablation/head2x0.75-feat-ce+kd-12ep-seed1"))
    ap.add_argument("--sum", default="fashion-mnist:2")
    ap.add_argument("--replace", default="fashion-mnist-independent:1")
    ap.add_argument("--json")
    args = ap.parse_args()
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    saved = np.load(run / "logits.npz")
    _, images, labels = test_set()
    assert (saved["test/labels"] == labels).all(), "the run's test labels are not the official test set's"
    teacher_flops = report["teacher_flops"]
    rows = []

    def compare(point: str, ablation: dict, served: dict) -> None:
        delta = served["accuracy"] - ablation["accuracy"]
        rows.append({"point": point, "ablation": ablation, "runtime": served, "delta_pt": delta,
                     "ok": abs(delta) <= TOLERANCE_PT})
        print(f"{point:<58} {ablation['accuracy']:6.2f} {served['accuracy']:6.2f} {delta:+6.2f}  "
              f"{100 * ablation['mean_flops'] / teacher_flops:6.2f} {100 * served['mean_flops'] / teacher_flops:6.2f}"
              f"  {ablation['exit_counts']} {served['exit_counts']}")

    print(f"{'operating point':<58} {'acc % (ablation / runtime / delta)':>22}  {'% teacher FLOPs':>13}  exits")
    reskd = open_version(args.sum)
    adaptive = report["adaptive"]
    compare(f"{args.sum} ({reskd.manifest.combine}) at the ablation's thresholds", adaptive["test"],
            at(reskd, adaptive["thresholds"], images, labels))
    full = report["cascade"]["depths"][-1]
    compare(f"{args.sum} every stage", {"accuracy": full["test_accuracy"], "mean_flops": full["flops"],
                                        "exit_counts": [0] * (reskd.num_stages - 1) + [len(labels)]},
            at(reskd, [1.0] * (reskd.num_stages - 1), images, labels))

    independent = open_version(args.replace)
    section = report["independent_cascade"]
    assert [s.name for s in independent.manifest.stages] == section["models"], "not the ablation's stages"
    for p in section["curve"]:
        budget = 100 * p["budget_flops"] / teacher_flops
        compare(f"{args.replace} ({independent.manifest.combine}) curve, budget {budget:.1f}%",
                {"accuracy": p["test_accuracy"], "mean_flops": p["test_mean_flops"],
                 "exit_counts": p["test_exit_counts"]}, at(independent, p["thresholds"], images, labels))
    matched = section["at_adaptive_flops"]
    compare(f"{args.replace} at the ResKD cascade's FLOPs", matched["test"] | {"exit_counts": matched["test"][
        "exit_counts"]}, at(independent, matched["thresholds"], images, labels))

    # The bundled versions' own thresholds: their calibration rule, applied the ablation's way to PyTorch's
    # validation logits, then measured on PyTorch's test logits.
    for ref in (args.sum, args.replace):
        rt = open_version(ref)
        manifest, cal = rt.manifest, rt.manifest.calibration
        names = [s.name for s in manifest.stages]

        def scores(split: str) -> CascadeScores:
            outs = np.stack([saved[f"{split}/{n}"] for n in names]).astype(np.float64)
            running = np.cumsum(outs, axis=0) if manifest.combine == "sum" else outs
            return CascadeScores(running, saved[f"{split}/labels"], manifest.stage_flops, manifest.exit.measure)

        if cal.target_drop_pt is not None:
            chosen = scores("val").calibrate(target_drop=cal.target_drop_pt / 100, z=cal.z or 0.0)
        else:
            chosen = scores("val").calibrate(flops_budget=cal.flops_budget_pct_teacher / 100 * teacher_flops)
        on_test = scores("test").evaluate(chosen.thresholds)
        served = at(rt, manifest.exit.thresholds, images, labels)
        print(f"  {ref}: thresholds from PyTorch's validation logits {np.round(chosen.thresholds, 6).tolist()}, "
              f"served {np.round(manifest.exit.thresholds, 6).tolist()}")
        compare(f"{ref} as bundled (its calibration rule)",
                {"accuracy": 100 * on_test.accuracy, "mean_flops": on_test.mean_flops,
                 "exit_counts": on_test.exit_counts}, served)

    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} operating points within {TOLERANCE_PT} pt")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "rows": rows}, indent=1))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
