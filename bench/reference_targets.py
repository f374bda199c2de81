"""The converged reference's targets (docs/reference.md), measured from the bundled versions alone, through the
runtime (ONNX, what is served) on the real Fashion-MNIST validation split (every choice) and test set (every figure):

    python bench/reference_targets.py [--reskd fashion-mnist:3] [--independent fashion-mnist-independent:2]
                                      [--teacher fashion-mnist-teacher:3] [--repo models] [--json FILE]

--reskd: the ResKD cascade with the teacher as its fallback stage (student, res-students, teacher); --independent:
the independent-models cascade with the same fallback; --teacher: the teacher version. Rows, each with its target
and MET / MISSED:
1. the teacher's test accuracy (>= 95.0%);
2. the default point (the version's calibrated thresholds) against the teacher: >= -0.3 pt, at <= 25% of its FLOPs;
3. at 10, 15, 20, 30, 40 and 50% of the teacher's FLOPs, ResKD + teacher against independent + teacher: the most
   accurate thresholds of each whole cascade within the budget on validation, measured on test (>= -0.1 pt);
4. the default point against the two-stage student -> teacher cascade calibrated on validation for the default's
   validation FLOPs (> 0: else the res-students are dead weight);
5. student + res-students without the fallback (every sample through them) against the student alone (>= +1.0 pt).
Differences are paired, with paired bootstrap 95% intervals over the test images (reskd.stats, seed 0). FLOPs = 2 x
MACs per image at batch 1 (torch.utils.flop_counter, from the manifests). Needs the train extra (the validation
split is rebuilt from the manifest's source.data, as `reskd calibrate` does). Exit status 0 whether targets are met
or not: this reports, it does not judge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import MODELS, machine, pinned
from reskd.exit_policy import CascadeScores
from reskd.export.runs import eval_sets
from reskd.runtime import CascadeRuntime
from reskd.stats import Bootstrap

BUDGETS_PCT = (10, 15, 20, 30, 40, 50)
TEACHER_MIN_PCT, DEFAULT_MIN_PT, DEFAULT_MAX_PCT, CURVE_MIN_PT, RES_MIN_PT = 95.0, -0.3, 25.0, -0.1, 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reskd", default="fashion-mnist:3")
    ap.add_argument("--independent", default="fashion-mnist-independent:2")
    ap.add_argument("--teacher", default="fashion-mnist-teacher:3")
    ap.add_argument("--repo", type=Path, default=MODELS)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()
    runtimes = {}
    for key, ref in (("reskd", args.reskd), ("independent", args.independent), ("teacher", args.teacher)):
        name, version = pinned(ref)
        runtimes[key] = CascadeRuntime(args.repo / name / str(version))
    reskd, teacher = runtimes["reskd"], runtimes["teacher"]
    for key in ("reskd", "independent"):
        m = runtimes[key].manifest
        if m.stage_combine[-1] != "replace" or m.stages[-1].sha256 != teacher.manifest.stages[0].sha256:
            raise SystemExit(f"{key}: {m.name}:{m.version} does not end with {args.teacher}'s network as a fallback")
    val, test = eval_sets(reskd.manifest.source.data, reskd.manifest.input)
    boot = Bootstrap(len(test.labels), args.bootstrap)
    teacher_flops = teacher.manifest.stages[0].flops
    measure = reskd.manifest.exit.measure

    # running logits after every stage, both splits, through the runtime
    logits = {}
    for key in ("reskd", "independent"):
        for split_name, split in (("val", val), ("test", test)):
            logits[key, split_name] = runtimes[key].all_stage_logits(split.images)
    teacher_correct = logits["reskd", "test"][-1].argmax(-1) == test.labels  # the fallback stage is the teacher
    rows, out = [], {"machine": machine(), "versions": {"reskd": args.reskd, "independent": args.independent,
                                                       "teacher": args.teacher}, "n_test": len(test.labels)}

    def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, list[float]]:
        return 100 * float(a.mean() - b.mean()), boot.interval(a, minus=b)

    # 1. the teacher
    acc = 100 * float(teacher_correct.mean())
    direct = 100 * float((teacher.run(test.images).class_id == test.labels).mean())
    assert abs(direct - acc) < 1e-9, "the fallback stage and the teacher version answer differently"
    rows.append(("teacher test accuracy", f"{acc:.2f}%", f">= {TEACHER_MIN_PCT}%", acc >= TEACHER_MIN_PCT))
    out["teacher_accuracy"] = acc

    # 2. the default point
    got = reskd.run(test.images)
    default_correct = got.class_id == test.labels
    pct = 100 * float(got.flops.mean()) / teacher_flops
    d, ci = diff(default_correct, teacher_correct)
    rows.append(("default point - teacher", f"{d:+.2f} pt [{ci[0]:+.2f}, {ci[1]:+.2f}] at {pct:.2f}% FLOPs",
                 f">= {DEFAULT_MIN_PT} pt at <= {DEFAULT_MAX_PCT}%", d >= DEFAULT_MIN_PT and pct <= DEFAULT_MAX_PCT))
    out["default"] = {"accuracy": 100 * float(default_correct.mean()), "pct_teacher_flops": pct, "vs_teacher_pt": d,
                      "ci95": ci, "stretch_met": d >= 0}

    # 3. ResKD + teacher against independent + teacher at equal validation budgets
    s = {(k, split): CascadeScores(logits[k, split], (val if split == "val" else test).labels,
                                   runtimes[k].stage_flops, measure)
         for k in ("reskd", "independent") for split in ("val", "test")}
    out["budgets"] = []
    for b in BUDGETS_PCT:
        budget = b / 100 * teacher_flops
        correct, pcts = {}, {}
        for k in ("reskd", "independent"):
            chosen = s[k, "val"].calibrate(flops_budget=budget)
            on_test = s[k, "test"].evaluate(chosen.thresholds)
            correct[k], pcts[k] = on_test.correct, 100 * on_test.mean_flops / teacher_flops
        d, ci = diff(correct["reskd"], correct["independent"])
        rows.append((f"ResKD - independent (both + teacher), {b}% budget",
                     f"{d:+.2f} pt [{ci[0]:+.2f}, {ci[1]:+.2f}] (test FLOPs {pcts['reskd']:.1f}% / "
                     f"{pcts['independent']:.1f}%)", f">= {CURVE_MIN_PT} pt", d >= CURVE_MIN_PT))
        out["budgets"].append({"budget_pct": b, "diff_pt": d, "ci95": ci, "reskd_accuracy":
                               100 * float(correct["reskd"].mean()), "independent_accuracy":
                               100 * float(correct["independent"].mean()), "test_pct_teacher_flops": pcts})

    # 4. the default point against student -> teacher at the default's validation FLOPs
    default_val_flops = s["reskd", "val"].evaluate(reskd.manifest.exit.thresholds).mean_flops
    two = {split: CascadeScores(np.stack([logits["reskd", split][0], logits["reskd", split][-1]]),
                                (val if split == "val" else test).labels,
                                [reskd.stage_flops[0], reskd.stage_flops[-1]], measure) for split in ("val", "test")}
    matched = two["test"].evaluate(two["val"].calibrate(flops_budget=default_val_flops).thresholds)
    d, ci = diff(default_correct, matched.correct)
    rows.append(("default point - student -> teacher, equal validation FLOPs",
                 f"{d:+.2f} pt [{ci[0]:+.2f}, {ci[1]:+.2f}] (test FLOPs {pct:.1f}% / "
                 f"{100 * matched.mean_flops / teacher_flops:.1f}%)", "> 0 pt", d > 0))
    out["two_stage"] = {"diff_pt": d, "ci95": ci, "two_stage_accuracy": 100 * float(matched.correct.mean()),
                        "two_stage_pct_teacher_flops": 100 * matched.mean_flops / teacher_flops}

    # 5. student + res-students (no fallback) against the student
    before_fallback = logits["reskd", "test"][-2].argmax(-1) == test.labels
    student = logits["reskd", "test"][0].argmax(-1) == test.labels
    d, ci = diff(before_fallback, student)
    rows.append(("student + res-students - student (no fallback)", f"{d:+.2f} pt [{ci[0]:+.2f}, {ci[1]:+.2f}] "
                 f"({100 * before_fallback.mean():.2f}% vs {100 * student.mean():.2f}%)", f">= +{RES_MIN_PT} pt",
                 d >= RES_MIN_PT))
    out["res_students"] = {"diff_pt": d, "ci95": ci, "full_accuracy": 100 * float(before_fallback.mean()),
                           "student_accuracy": 100 * float(student.mean())}

    print(f"machine: {machine()}; {len(test.labels)} test images, {len(val.labels)} validation images; "
          f"{args.reskd}, {args.independent}, {args.teacher}")
    width = max(len(r[0]) for r in rows)
    for what, figure, target, met in rows:
        print(f"{what:<{width}}  {figure:<58}  {target:<22}  {'MET' if met else 'MISSED'}")
    out["rows"] = [{"what": w, "figure": f, "target": t, "met": bool(m)} for w, f, t, m in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
