"""Every stored operating point of a fallback cascade on the real Fashion-MNIST test set, through the runtime and a
server, beside the two-stage student -> teacher cascade at the same FLOPs budgets.

    python bench/operating_points.py [--cascade fashion-mnist-fallback:1] [--base fashion-mnist:2]
                                     [--teacher fashion-mnist-teacher:2] [--no-served] [--json FILE]

The two-stage cascade is composed here (`reskd compose --keep 1`: the base cascade's student, then the teacher)
into a temporary repository and calibrated on validation like the fallback version, so both curves hold the same
budget points ("budget-20": the most accurate thresholds within 20% of the teacher's FLOPs on validation); its
default point is calibrated for the fallback version's default FLOPs on validation, so the two defaults compare at
equal compute too. Each
point is read from its manifest (chosen on validation) and measured once on the test set. Served: a `reskd serve`
on loopback answers the test set at every point (v2, binary FP32 tensors, the `operating_point` parameter) and
must give the runtime's classes and exits. Intervals: paired bootstrap 95% over the test images (reskd.stats).
FLOPs = 2 x MACs per image at batch 1 (torch.utils.flop_counter, from the manifests). Needs the train extra (the
composition rebuilds the validation split).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import MODELS, ROOT, machine, pinned, test_set
from reskd.export.compose import compose_fallback
from reskd.runtime import CascadeRuntime
from reskd.stats import Bootstrap

sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

BATCH = 250  # images per served request (the server's default limit is 256)


def served_answers(url: str, name: str, version: int, point: str, images: np.ndarray) -> dict[str, np.ndarray]:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    got = {"class_id": [], "exit_stage": [], "flops": []}
    for i in range(0, len(images), BATCH):
        x = triton.InferInput("images", [len(images[i:i + BATCH]), *images.shape[1:]], "FP32")
        x.set_data_from_numpy(images[i:i + BATCH], binary_data=True)
        out = client.infer(name, [x], model_version=str(version), parameters={"operating_point": point},
                           outputs=[triton.InferRequestedOutput(k, binary_data=True) for k in got])
        for k in got:
            got[k].append(out.as_numpy(k))
    return {k: np.concatenate(v) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cascade", default="fashion-mnist-fallback:1", help="the fallback version, NAME:VERSION")
    ap.add_argument("--base", default="fashion-mnist:2", help="whose student the two-stage cascade starts with")
    ap.add_argument("--teacher", default="fashion-mnist-teacher:2", help="the teacher version, NAME:VERSION")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--no-served", action="store_true", help="skip the server")
    ap.add_argument("--json")
    args = ap.parse_args()
    (name, version), (teacher_name, teacher_version) = pinned(args.cascade), pinned(args.teacher)
    base_name, base_version = pinned(args.base)
    _, images, labels = test_set()
    boot = Bootstrap(len(labels), args.bootstrap)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for model, v in {(name, version), (teacher_name, teacher_version), (base_name, base_version)}:
            shutil.copytree(MODELS / model / str(v), repo / model / str(v))  # once: a fallback version is its own base
        two_stage = f"{base_name}-student-teacher"
        # its calibrated point at the fallback version's compute on validation, so the defaults compare at equal
        # FLOPs as the budget points do
        default = CascadeRuntime(repo / name / str(version)).manifest.operating_points.point("default")
        compose_fallback(repo, two_stage, cascade=args.base, keep=1, fallback=args.teacher, version=1,
                         flops_budget_pct=default.pct_teacher_flops, log=lambda msg: None)
        teacher = CascadeRuntime(repo / teacher_name / str(teacher_version))
        teacher_correct = teacher.run(images).class_id == labels
        teacher_flops = teacher.manifest.stages[0].flops
        versions = {args.cascade: (name, version), f"{two_stage}:1": (two_stage, 1)}
        results = {"machine": machine(), "teacher": args.teacher, "n": len(labels),
                   "teacher_accuracy": 100 * float(teacher_correct.mean()), "curves": {}}
        correct_at: dict[tuple[str, str], np.ndarray] = {}
        server = None if args.no_served else ServerProcess(repo=repo, log_level="warning")
        try:
            if server:
                server.__enter__()
            for ref, (model, v) in versions.items():
                rt = CascadeRuntime(repo / model / str(v))
                rows = []
                for p in rt.manifest.operating_points.points:
                    got = rt.run(images, point=p.id)
                    correct = got.class_id == labels
                    correct_at[ref, p.id] = correct
                    row = {"id": p.id, "max_stage": p.max_stage, "val_accuracy": 100 * p.accuracy,
                           "val_pct_teacher_flops": p.pct_teacher_flops, "accuracy": 100 * float(correct.mean()),
                           "vs_teacher_pt": 100 * float(correct.mean() - teacher_correct.mean()),
                           "vs_teacher_ci95": boot.interval(correct, minus=teacher_correct),
                           "pct_teacher_flops": 100 * float(got.flops.mean()) / teacher_flops,
                           "exit_fractions": (np.bincount(got.exit_stage, minlength=rt.num_stages)
                                              / len(labels)).tolist()}
                    if server:
                        served = served_answers(server.url, model, v, p.id, images)
                        row["served_identical"] = bool(np.array_equal(served["class_id"], got.class_id)
                                                       and np.array_equal(served["exit_stage"], got.exit_stage))
                        row["served_accuracy"] = 100 * float((served["class_id"] == labels).mean())
                    rows.append(row)
                results["curves"][ref] = rows
        finally:
            if server:
                server.__exit__(None, None, None)

    print(f"machine: {machine()}; {len(labels)} test images; teacher {args.teacher} "
          f"{results['teacher_accuracy']:.2f}%; FLOPs = 2 x MACs per image")
    for ref, rows in results["curves"].items():
        print(f"\n{ref}: points chosen on validation, measured on test (paired 95% CI against the teacher)")
        print(f"{'point':<12} {'max':>3} {'% teacher':>9} {'accuracy %':>10} {'vs teacher pt':>14} "
              f"{'95% CI':>16} {'served':>7}  exits per stage")
        for r in rows:
            lo, hi = r["vs_teacher_ci95"]
            served = "-" if "served_identical" not in r else ("same" if r["served_identical"] else "DIFFERS")
            print(f"{r['id']:<12} {r['max_stage']:>3} {r['pct_teacher_flops']:>9.2f} {r['accuracy']:>10.2f} "
                  f"{r['vs_teacher_pt']:>+14.2f} [{lo:+6.2f}, {hi:+6.2f}] {served:>7}  "
                  f"{'/'.join(f'{f:.3f}' for f in r['exit_fractions'])}")
    fallback, two = list(versions)
    print(f"\nat the same validation budget: {fallback} minus {two} (paired 95% CI), test FLOPs of each")
    results["equal_budget"] = []
    for r in results["curves"][fallback]:
        other = next((o for o in results["curves"][two] if o["id"] == r["id"]), None)
        if other is None or not (r["id"].startswith("budget-") or r["id"] == "default"):
            continue
        a, b = correct_at[fallback, r["id"]], correct_at[two, r["id"]]
        lo, hi = boot.interval(a, minus=b)
        entry = {"id": r["id"], "diff_pt": 100 * float(a.mean() - b.mean()), "ci95": [lo, hi],
                 "pct_teacher_flops": [r["pct_teacher_flops"], other["pct_teacher_flops"]]}
        results["equal_budget"].append(entry)
        print(f"{r['id']:<12} {entry['diff_pt']:+6.2f} [{lo:+6.2f}, {hi:+6.2f}]   "
              f"{r['pct_teacher_flops']:6.2f}% vs {other['pct_teacher_flops']:6.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
