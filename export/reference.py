"""The converged reference, bundled from its sweep (docs/reference.md, "What follows the training"):

    python -m reskd.export.reference --sweep-dir ~/reskd-runs/reference --repo models   (make bundle-reference)

1. The variant the sweep's doubling pairs chose (sweep.json `doubling_choice`, validation only) is the reference;
   refused while any pair of the sweep file is unmeasured (the sweep has not finished).
2. The default point's rule, fixed before the export reads the test set: the recipe's (minimum FLOPs within
   `target_drop_pt` of the full cascade, the teacher included, on validation) when that point's validation FLOPs
   are within --max-pct-teacher-flops of the teacher's (25: the issue's bound), else the most accurate point within
   that budget. Read from the run's report (PyTorch logits of the validation split, the calibration the export
   repeats through the runtime).
3. `reskd export --fallback teacher` of the ResKD cascade as NAME/VERSION (+ NAME-teacher/VERSION), and of the
   independent-models cascade (student -> KD resnet8 -> KD resnet14, the same teacher fallback) into a scratch
   repository, whose cascade is copied in as NAME-independent/INDEPENDENT_VERSION naming NAME-teacher/VERSION as
   its teacher (its teacher stage is checked to be the same network, bit for bit, first).

The test set is read once per version written, by the export itself. Nothing is written when any step fails before
the exports; an export that fails leaves the versions written before it (each export is all or nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from reskd.manifest import ManifestError, ModelRepository, load_manifest, write_manifest

from .command import export_run
from .errors import ExportError


class BundleError(RuntimeError):
    """The sweep cannot be bundled yet, or the repository cannot take it; the message says why."""


def chosen_run(sweep_dir: Path, sweep_file: Path) -> tuple[str, Path]:
    """(variant, its run directory): what the doubling pairs chose, once every pair of the sweep file is measured."""
    from reskd.training.sweep import load_sweep

    summary_path = sweep_dir / "sweep.json"
    if not summary_path.is_file():
        raise BundleError(f"{summary_path} does not exist: run the sweep first (make train-reference)")
    summary = json.loads(summary_path.read_text())
    wanted = {(e["model"], a, b) for e in load_sweep(sweep_file).get("doubling", []) for a, b in e["pairs"]}
    measured = {(p["model"], p["shorter"], p["longer"]) for p in summary.get("doubling") or []}
    missing = sorted(wanted - measured)
    if missing or not summary.get("doubling_choice"):
        shown = ", ".join(f"{m} {a}/{b}" for m, a, b in missing) or "all pairs measured, no choice written"
        raise BundleError(f"{summary_path}: the sweep has not finished; unmeasured doubling pairs: {shown}")
    variant = summary["doubling_choice"]["variant"]
    run = sweep_dir / variant
    if not (run / "report.json").is_file():
        raise BundleError(f"{run}/report.json does not exist")
    return variant, run


def default_rule(run: Path, max_pct: float) -> dict:
    """The export's calibration arguments for the default point, from the run's report (validation figures only)."""
    report = json.loads((run / "report.json").read_text())
    point = report["fallback"]["cascades"]["ResKD + teacher"]["points"]["calibrated"]
    pct = 100 * point["val_mean_flops"] / report["teacher_flops"]
    if pct <= max_pct:
        return {"target_drop_pt": None, "flops_budget_pct": None, "why":
                f"the recipe's rule: its validation point costs {pct:.2f}% of the teacher's FLOPs (<= {max_pct:g}%)"}
    return {"target_drop_pt": None, "flops_budget_pct": max_pct, "why":
            f"the recipe's rule costs {pct:.2f}% of the teacher's FLOPs on validation, over {max_pct:g}%: the most "
            f"accurate point within {max_pct:g}% instead"}


def bundle(sweep_dir: Path, sweep_file: Path, repo: Path, name: str, version: int, independent_version: int,
           max_pct: float, log=print) -> dict:
    variant, run = chosen_run(sweep_dir, sweep_file)
    repository = ModelRepository(repo, create=True)
    independent = f"{name}-independent"
    for n, v in ((name, version), (f"{name}-teacher", version), (independent, independent_version)):
        repository.check_new(n, v)  # all three before the first export writes anything
    rule = default_rule(run, max_pct)
    log(f"reference: variant {variant} ({run}); default point: {rule['why']}")
    out = export_run(run, repo, name, version, target_drop_pt=rule["target_drop_pt"],
                     flops_budget_pct=rule["flops_budget_pct"], fallback="teacher", log=log)
    teacher_ref = f"{name}-teacher:{version}"
    teacher_sha = load_manifest(Path(out["teacher"])).stages[0].sha256
    with tempfile.TemporaryDirectory(prefix="reskd-bundle-") as scratch:
        other = export_run(run, scratch, independent, independent_version, combine="replace", fallback="teacher",
                           log=log)
        src = Path(other["cascade"])
        manifest = load_manifest(src)
        if manifest.stages[-1].sha256 != teacher_sha:
            raise BundleError(f"the independent cascade's teacher stage ({manifest.stages[-1].sha256[:12]}) is not "
                              f"{teacher_ref}'s network ({teacher_sha[:12]}): the export is not deterministic")
        manifest = manifest.model_copy(update={"teacher": manifest.teacher.model_copy(update={"model": teacher_ref})})
        write_manifest(src, manifest)
        dst = repository.check_new(independent, independent_version)
        shutil.copytree(src, dst)
    repository.load(independent, independent_version)  # as a server would load it
    return {"variant": variant, "run": str(run), "default_rule": rule["why"], "versions": [
        f"{name}:{version}", teacher_ref, f"{independent}:{independent_version}"]}


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(prog="python -m reskd.export.reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep-dir", required=True, type=Path, help="the sweep's --out (e.g. ~/reskd-runs/reference)")
    ap.add_argument("--sweep", type=Path, default=root / "training" / "sweeps" / "fashion-mnist-reference.toml")
    ap.add_argument("--repo", type=Path, default=root / "models")
    ap.add_argument("--name", default="fashion-mnist")
    ap.add_argument("--version", type=int, default=3, help="of NAME and NAME-teacher (default 3)")
    ap.add_argument("--independent-version", type=int, default=2, help="of NAME-independent (default 2)")
    ap.add_argument("--max-pct-teacher-flops", type=float, default=25.0,
                    help="the default point's bound on validation (default 25: the issue's target)")
    args = ap.parse_args(argv)
    try:
        out = bundle(args.sweep_dir.expanduser(), args.sweep, args.repo, args.name, args.version,
                     args.independent_version, args.max_pct_teacher_flops,
                     log=lambda msg: print(msg, file=sys.stderr))
    except (BundleError, ExportError, ManifestError, FileNotFoundError) as err:
        print(f"bundle-reference: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
