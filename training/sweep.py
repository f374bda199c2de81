"""`reskd sweep`: a grid of recipe variants, sharing every stage two variants would train identically.

A sweep file names a base recipe, overrides every variant shares ([fixed], e.g. no KD grid while searching), and
axes; each axis is a list of variants (dotted recipe overrides plus a label); the sweep runs the product. Before a
variant runs, any finished checkpoint of an earlier variant with the same stage fingerprint (same data, seed,
settings and upstream stages) is linked into its run directory, so a teacher is trained once per teacher setting,
not once per student. Rerunning a sweep resumes it; a variant whose report is newer than its checkpoints, with
the same recipe and fingerprints, is read back instead of evaluated again.

Selection uses validation figures only; test figures are shown beside them but never choose anything.
Epoch counts can be checked by doubling ([[doubling]]: a model of the report, or `cascade` for the full cascade,
and pairs of variants whose second trains it twice as long): the summary gives each pair's validation gain and
whether the shorter count stands (gain < `doubling_min_gain_pt`, default 0.2 pt), and the variant the pairs
choose, axis by axis (doubling_choice).
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

import torch

from .distributed import SINGLE, World
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
    for entry in spec.get("doubling", []):
        pairs = entry.get("pairs")
        if not isinstance(entry.get("model"), str) or not pairs or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise RecipeError(f"{path}: each [[doubling]] needs `model` (a model of the report, or \"cascade\") and "
                              "`pairs`, a list of [shorter, longer] variant labels")
    return spec


def grid(spec: dict) -> list[tuple[str, tuple[dict, ...]]]:
    """Every grid point: its label (the axes' labels joined by "_") and its variant on each axis, in order."""
    return [("_".join(v["label"] for v in combo), combo)
            for combo in itertools.product(*(axis["variants"] for axis in spec["axes"]))]


def variants(spec: dict, tiny: bool) -> list[tuple[str, dict, dict]]:
    """(label, overrides, the variant's own overrides) per grid point: overrides are the file's [fixed] ones, then
    each axis' variant, then [tiny]."""
    out = []
    for label, combo in grid(spec):
        own = {k: val for v in combo for k, val in v.items() if k != "label"}
        overrides = {**spec.get("fixed", {}), **own}
        if tiny:
            overrides.update(spec.get("tiny", {}))
        out.append((label, overrides, own))
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:  # another sweep process (--only) linked it first: never write over a shared file
        return
    except OSError:
        shutil.copy2(src, dst)


def run_sweep(sweep_file: str, out: str, *, tiny: bool = False, device: str | torch.device = "auto",
              only: list[str] | None = None, world: World = SINGLE) -> list[dict]:
    """only: labels of the variants to train and evaluate; every other variant is read back where its report is
    up to date (it is then summarised) and left out otherwise; its finished stages are shared either way (two
    processes with --only can split a sweep once the stages they share are trained). world: under torchrun, every
    rank trains each variant with the others (Trainer); rank 0 alone reads and writes the sweep's files and tells
    the others what it found."""
    path = Path(sweep_file)
    spec = load_sweep(path)
    base = spec["base"]
    if (path.parent / base).is_file():
        base = str(path.parent / base)
    out_dir = Path(out)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    trained: dict[tuple[str, str], Path] = {}
    predictions: dict = {}  # logits of the shared stages, computed once (Trainer.evaluate)
    rows, reports = [], {}
    plan = variants(spec, tiny)
    # Validate every variant before the first one trains: a typo in the last one should not cost an hour.
    recipes = [(label, load_recipe(base, overrides), own) for label, overrides, own in plan]
    labels = {label for label, _, _ in recipes}
    unknown = sorted(set(only or []) - labels)
    if unknown:
        raise RecipeError(f"{path}: no variant labelled {', '.join(unknown)}")
    unpaired = sorted({x for e in spec.get("doubling", []) for pair in e["pairs"] for x in pair} - labels)
    if unpaired:
        raise RecipeError(f"{path}: [[doubling]] names no variant {', '.join(unpaired)} (variants: "
                          f"{', '.join(sorted(labels))})")
    for i, (label, recipe, own) in enumerate(recipes):
        if world.main:
            print(f"[sweep] {i + 1}/{len(recipes)} {label}", file=sys.stderr, flush=True)
        trainer = Trainer(recipe, out_dir / label, resume=True, device=device, predictions=predictions, world=world)
        fps = trainer.fingerprints()
        if world.main:
            for name, fp in fps.items():
                dst = trainer.run_dir.checkpoint_path(name)
                if (name, fp) in trained and not dst.exists():
                    _link(trained[(name, fp)], dst)
        report = world.broadcast(trainer.run_dir.current_report(recipe.model_dump(mode="json"), fps)
                                 if world.main else None)
        if report is None and only is not None and label not in only:
            if world.main:
                print(f"[sweep] {label}: not up to date, left to another run (--only)", file=sys.stderr, flush=True)
                # Its finished stages are shared all the same: a first process may be training this variant's later
                # stages while this one trains another variant from the same teacher.
                for name, fp in fps.items():
                    ckpt = trainer.run_dir.checkpoint_path(name)
                    if ckpt.is_file() and trainer.run_dir.load_checkpoint(name).fingerprint == fp:
                        trained.setdefault((name, fp), ckpt)
            continue
        if report is None:
            report = world.broadcast(trainer.run())
        elif world.main:
            print(f"[sweep] {label}: up to date (report newer than its checkpoints, same recipe)", file=sys.stderr,
                  flush=True)
        for name, fp in fps.items():
            trained.setdefault((name, fp), trainer.run_dir.checkpoint_path(name))
        rows.append(summarise(label, own, report))
        reports[label] = report
    if not world.main:
        return rows
    select_pct = float(spec.get("select_max_pct_teacher_flops", 100.0))
    pairs = doubling(spec.get("doubling", []), reports, float(spec.get("doubling_min_gain_pt", 0.2)))
    write_summary(out_dir, rows, select_pct, pairs, doubling_choice(spec, pairs) if pairs else None)
    plot_sweep(reports, out_dir / "sweep.png")
    return rows


BUDGETS_PCT = (10, 15, 20, 25, 30)  # mean FLOPs budgets (% of the teacher's) at which cascades are compared


def best_within(curve: list[dict], teacher_flops: int, pct: float) -> float | None:
    """The highest test accuracy among a curve's validation-calibrated points whose test mean FLOPs are within
    `pct` % of the teacher's (None: no point is that cheap)."""
    inside = [c["test_accuracy"] for c in curve if 100 * c["test_mean_flops"] / teacher_flops <= pct + 1e-9]
    return max(inside, default=None)


def summarise(label: str, overrides: dict, report: dict) -> dict:
    m, a = report["models"], report["adaptive"]
    depths = report["cascade"]["depths"]
    tf = report["teacher_flops"]
    diffs = {d["what"]: d for d in report["differences"]}
    independent = report.get("independent_cascade")
    return {
        "variant": label,
        "config": ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "(base recipe)",
        "teacher": m["teacher"]["tag"], "student": m["student"]["tag"],
        "res_students": [f"{m[n]['tag']}" for n in report["cascade"]["stages"][1:]],
        "full_pct_teacher_flops": depths[-1]["pct_teacher_flops"],
        "val_teacher": m["teacher"]["val_accuracy"], "val_student": m["student"]["val_accuracy"],
        "val_full_cascade": depths[-1]["val_accuracy"], "val_adaptive": a["val"]["accuracy"],
        "val_adaptive_pct_teacher_flops": round(100 * a["val"]["mean_flops"] / tf, 3),
        "test_teacher": m["teacher"]["test_accuracy"], "test_student": m["student"]["test_accuracy"],
        "test_full_cascade": depths[-1]["test_accuracy"], "test_full_ci95": depths[-1]["test_ci95"],
        "full_minus_student": diffs["full cascade - student"],
        "test_adaptive": a["test"]["accuracy"], "test_adaptive_ci95": a["test"]["ci95"],
        "test_adaptive_pct_teacher_flops": a["test"]["pct_teacher_flops"], "test_exits": a["test"]["exit_counts"],
        "adaptive_minus_teacher": diffs["adaptive - teacher"],
        "frontier": {str(b): best_within(report["adaptive_curve"], tf, b) for b in BUDGETS_PCT},
        "independent_frontier": ({str(b): best_within(independent["curve"], tf, b) for b in BUDGETS_PCT}
                                 if independent else None),
    }


def val_accuracy(report: dict, model: str) -> float | None:
    """A model's validation accuracy in a report (`cascade`: the full cascade's); None where the report lacks it."""
    if model == "cascade":
        return report["cascade"]["depths"][-1]["val_accuracy"]
    entry = report["models"].get(model)
    return None if entry is None else entry["val_accuracy"]


def doubling(entries: list[dict], reports: dict[str, dict], min_gain_pt: float) -> list[dict]:
    """Each pair of every [[doubling]] entry whose two variants were reported: the validation accuracy of the
    model trained for the shorter and the longer count, the gain, and whether the shorter count stands (it gained
    less than min_gain_pt by doubling)."""
    out = []
    for entry in entries:
        for short, long in entry["pairs"]:
            if short not in reports or long not in reports:
                continue
            a, b = val_accuracy(reports[short], entry["model"]), val_accuracy(reports[long], entry["model"])
            if a is None or b is None:
                continue
            gain = round(b - a, 3)
            out.append({"model": entry["model"], "shorter": short, "longer": long, "val_shorter": a, "val_longer": b,
                        "gain_pt": gain, "min_gain_pt": min_gain_pt,
                        "keeps": "shorter" if gain < min_gain_pt else "longer"})
    return out


def doubling_choice(spec: dict, pairs: list[dict]) -> dict:
    """The variant the doubling pairs choose, axis by axis in the file's order: an axis takes the longer label of
    a pair that differs on it alone (and agrees with what earlier axes chose) when that pair found the longer count
    worth it, else the shorter label; None where no measured pair decides it (nor, then, any later axis).
    -> {"axes": {axis name: label or None}, "variant": label or None}."""
    labels = {label: tuple(v["label"] for v in combo) for label, combo in grid(spec)}  # its label on each axis
    names = [axis.get("name", f"axis {i}") for i, axis in enumerate(spec["axes"])]
    chosen: list[str | None] = []
    for i in range(len(names)):
        relevant = []
        for p in pairs:
            a, b = labels[p["shorter"]], labels[p["longer"]]
            if [j for j in range(len(a)) if a[j] != b[j]] == [i] and all(a[j] == chosen[j] for j in range(i)):
                relevant.append(p)
        longer = [p for p in relevant if p["keeps"] == "longer"]
        chosen.append(labels[longer[0]["longer"]][i] if longer else
                      labels[relevant[0]["shorter"]][i] if relevant else None)
    variant = "_".join(chosen) if all(c is not None for c in chosen) else None
    return {"axes": dict(zip(names, chosen)), "variant": variant}


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def write_summary(out_dir: Path, rows: list[dict], select_pct: float, pairs: list[dict] | None = None,
                  choice: dict | None = None) -> None:
    eligible = [r for r in rows if r["val_adaptive_pct_teacher_flops"] <= select_pct]
    best = max(eligible, key=lambda r: (r["val_adaptive"], -r["val_adaptive_pct_teacher_flops"]), default=None)
    (out_dir / "sweep.json").write_text(json.dumps({"rows": rows, "selected": best,
                                                    "select_max_pct_teacher_flops": select_pct,
                                                    "doubling": pairs or [], "doubling_choice": choice},
                                                   indent=1))
    lines = ["# Sweep summary", "",
             f"Selected (highest validation accuracy of the adaptive cascade at ≤ {select_pct:g}% of teacher FLOPs "
             f"on validation): **{best['variant'] if best else 'none'}**. Test columns are for reading, not choosing.",
             "Accuracy in %, test intervals are 95% bootstrap intervals; Δ are paired differences on the test set.",
             "", "| variant | res-students | full FLOPs % | val full | val adaptive (FLOPs %) | test full [CI] | "
             "Δ full − student [CI] | test adaptive [CI] | adaptive FLOPs % | test exits | config |",
             "|---|---|---:|---:|---|---|---|---|---:|---|---|"]
    for r in sorted(rows, key=lambda r: -r["val_adaptive"]):
        d = r["full_minus_student"]
        lines.append(
            f"| {r['variant']} | {' + '.join(r['res_students']) or '—'} | {r['full_pct_teacher_flops']:.2f} | "
            f"{r['val_full_cascade']:.2f} | {r['val_adaptive']:.2f} ({r['val_adaptive_pct_teacher_flops']:.2f}) | "
            f"{r['test_full_cascade']:.2f} {_ci(r['test_full_ci95'])} | {d['delta_pt']:+.2f} {_ci(d['ci95'])} | "
            f"{r['test_adaptive']:.2f} {_ci(r['test_adaptive_ci95'])} | {r['test_adaptive_pct_teacher_flops']:.2f} | "
            f"{r['test_exits']} | `{r['config']}` |")
    reference = next((r["independent_frontier"] for r in rows if r["independent_frontier"]), None)
    lines += ["", "Best test accuracy of each adaptive curve (thresholds calibrated on validation for a range of "
              "FLOPs budgets) whose test mean FLOPs stay within a budget, % of the teacher's:", "",
              "| variant | " + " | ".join(f"≤ {b}%" for b in BUDGETS_PCT) + " |",
              "|---|" + "---:|" * len(BUDGETS_PCT)]
    if reference:
        lines.append("| independent-models cascade | " + " | ".join(_acc(reference[str(b)]) for b in BUDGETS_PCT)
                     + " |")
    for r in sorted(rows, key=lambda r: -r["val_adaptive"]):
        lines.append(f"| {r['variant']} | " + " | ".join(_acc(r["frontier"][str(b)]) for b in BUDGETS_PCT) + " |")
    if pairs:
        lines += ["", f"Epoch counts checked by doubling (validation accuracy, %): the shorter count stands when the "
                  f"longer gained less than {pairs[0]['min_gain_pt']:g} pt.", "",
                  "| model | shorter | longer | val shorter | val longer | gain pt | stands |",
                  "|---|---|---|---:|---:|---:|---|"]
        for p in pairs:
            lines.append(f"| {p['model']} | {p['shorter']} | {p['longer']} | {p['val_shorter']:.2f} | "
                         f"{p['val_longer']:.2f} | {p['gain_pt']:+.2f} | {p['keeps']} |")
        if choice is not None:
            axes = ", ".join(f"{name}: {label or 'undecided'}" for name, label in choice["axes"].items())
            lines += ["", f"The variant these pairs choose: **{choice['variant'] or 'none yet'}** ({axes})."]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def plot_sweep(reports: dict[str, dict], path: Path) -> None:
    """Every variant's adaptive curve (test), the independent-models cascade, the KD single models, the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not reports:
        return
    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    first = next(iter(reports.values()))
    tf = first["teacher_flops"]
    for i, (label, r) in enumerate(reports.items()):
        curve = sorted(r["adaptive_curve"], key=lambda c: c["test_mean_flops"])
        ax.plot([100 * c["test_mean_flops"] / tf for c in curve], [c["test_accuracy"] for c in curve], "-o", ms=2,
                lw=1, color=plt.cm.tab20(i % 20), label=label)
    ind = next((r["independent_cascade"] for r in reports.values() if r.get("independent_cascade")), None)
    if ind:
        curve = sorted(ind["curve"], key=lambda c: c["test_mean_flops"])
        ax.plot([100 * c["test_mean_flops"] / tf for c in curve], [c["test_accuracy"] for c in curve], "k--x",
                lw=1.5, label="independent-models cascade")
    grid = first["kd_grid"]
    if grid:
        ax.plot([g["pct_teacher_flops"] for g in grid], [g["test_accuracy"] for g in grid], "k^", ms=7,
                label="KD single models")
    ax.axhline(first["models"]["teacher"]["test_accuracy"], color="k", lw=0.8, ls=":", label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per sample, % of teacher (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
