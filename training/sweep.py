"""`reskd sweep`: a grid of recipe variants, sharing every stage two variants would train identically.

A sweep file names a base recipe, overrides every variant shares ([fixed], e.g. no KD grid while searching), and
axes; each axis is a list of variants (dotted recipe overrides plus a label); the sweep runs the product. Before a variant runs, any finished checkpoint of an earlier variant with the same
stage fingerprint (same data, seed, settings and upstream stages) is linked into its run directory, so a teacher
is trained once per teacher setting, not once per student. Rerunning a sweep resumes it.

Selection uses validation figures only; test figures are shown beside them but never choose anything.
With --tiny, the file's [tiny] overrides shrink data and epochs so the whole grid runs end to end on a CPU in
minutes: the GPU time then goes to training, not to debugging.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

from .pipeline import Trainer
from .recipe import RecipeError, load_recipe


def load_sweep(path: Path) -> dict:
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise RecipeError(f"cannot read sweep file {path}: {err}") from None
    if "base" not in spec or not spec.get("axes"):
        raise RecipeError(f"{path}: a sweep needs `base` (a recipe) and at least one [[axes]] table")
    for axis in spec["axes"]:
        if not axis.get("variants") or any("label" not in v for v in axis["variants"]):
            raise RecipeError(f"{path}: axis {axis.get('name', '?')!r} needs variants, each with a `label`")
    return spec


def variants(spec: dict, tiny: bool) -> list[tuple[str, dict]]:
    """(label, overrides) per grid point: the file's [fixed] overrides, then each axis' variant, then [tiny]."""
    out = []
    for combo in itertools.product(*(axis["variants"] for axis in spec["axes"])):
        overrides = dict(spec.get("fixed", {}))
        for v in combo:
            overrides.update({k: val for k, val in v.items() if k != "label"})
        if tiny:
            overrides.update(spec.get("tiny", {}))
        out.append(("_".join(v["label"] for v in combo), overrides))
    return out


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_sweep(sweep_file: str, out: str, *, tiny: bool = False, device: str = "auto") -> list[dict]:
    path = Path(sweep_file)
    spec = load_sweep(path)
    base = spec["base"]
    if (path.parent / base).is_file():
        base = str(path.parent / base)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained: dict[tuple[str, str], Path] = {}
    rows = []
    plan = variants(spec, tiny)
    # Validate every variant before the first one trains: a typo in the last one should not cost an hour.
    recipes = [(label, load_recipe(base, overrides)) for label, overrides in plan]
    for i, (label, recipe) in enumerate(recipes):
        print(f"[sweep] {i + 1}/{len(recipes)} {label}", file=sys.stderr, flush=True)
        trainer = Trainer(recipe, out_dir / label, resume=True, device=device)
        fps = trainer.fingerprints()
        for name, fp in fps.items():
            dst = trainer.run_dir.checkpoint_path(name)
            if (name, fp) in trained and not dst.exists():
                _link(trained[(name, fp)], dst)
        report = trainer.run()
        for name, fp in fps.items():
            trained.setdefault((name, fp), trainer.run_dir.checkpoint_path(name))
        rows.append(summarise(label, report))
    select_pct = float(spec.get("select_max_pct_teacher_flops", 100.0))
    write_summary(out_dir, rows, select_pct)
    return rows


def summarise(label: str, report: dict) -> dict:
    m, a = report["models"], report["adaptive"]
    depths = report["cascade"]["depths"]
    tf = report["teacher_flops"]
    return {
        "variant": label,
        "teacher": m["teacher"]["tag"], "student": m["student"]["tag"],
        "val_teacher": m["teacher"]["val_accuracy"], "val_student": m["student"]["val_accuracy"],
        "val_full_cascade": depths[-1]["val_accuracy"], "val_adaptive": a["val"]["accuracy"],
        "val_adaptive_pct_teacher_flops": round(100 * a["val"]["mean_flops"] / tf, 3),
        "test_teacher": m["teacher"]["test_accuracy"], "test_adaptive": a["test"]["accuracy"],
        "test_adaptive_pct_teacher_flops": a["test"]["pct_teacher_flops"],
    }


def write_summary(out_dir: Path, rows: list[dict], select_pct: float) -> None:
    eligible = [r for r in rows if r["val_adaptive_pct_teacher_flops"] <= select_pct]
    best = max(eligible, key=lambda r: (r["val_adaptive"], -r["val_adaptive_pct_teacher_flops"]), default=None)
    (out_dir / "sweep.json").write_text(json.dumps({"rows": rows, "selected": best,
                                                    "select_max_pct_teacher_flops": select_pct}, indent=1))
    cols = list(rows[0]) if rows else []
    lines = ["# Sweep summary", "",
             f"Selected (highest validation accuracy of the adaptive cascade at ≤ {select_pct:g}% of teacher FLOPs "
             f"on validation): **{best['variant'] if best else 'none'}**. Test columns are for reading, not choosing.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: -r["val_adaptive"]):
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
