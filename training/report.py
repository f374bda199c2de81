"""The run's evidence: accuracy with bootstrap intervals, FLOPs (2 x MACs at batch 1) and parameters of every model,
each cumulative cascade depth, the adaptive cascade at thresholds calibrated on validation, the adaptive curve, the
KD single-model grid and the independent-students cascade -> report.json, report.md, pareto.png.

analyse() computes the report (a dict, section by section); render_markdown() and plot_pareto() draw it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reskd.cascade import running_logits
from reskd.exit_policy import CascadeScores, ExitOutcome
from reskd.stats import Bootstrap

FLOPS_NOTE = ("FLOPs per sample = 2 x multiply-accumulates of one forward pass at batch 1, counted by "
              "torch.utils.flop_counter (convolutions and linear layers)")


def _pct(x: float) -> float:
    return round(float(x) * 100, 3)


def _curve(val: CascadeScores, test: CascadeScores, points: int = 24) -> list[dict]:
    """Thresholds calibrated on validation for a range of FLOPs budgets, then measured on test."""
    lo, hi = val.stage_flops[0], val.cum_flops[-1]
    curve, seen = [], set()
    for budget in np.linspace(lo, hi, points):
        chosen = val.calibrate(flops_budget=float(budget))
        key = tuple(chosen.thresholds)
        if key in seen:
            continue
        seen.add(key)
        t = test.evaluate(chosen.thresholds)
        curve.append({"budget_flops": float(budget), "thresholds": chosen.thresholds,
                      "val_accuracy": _pct(chosen.accuracy), "val_mean_flops": chosen.mean_flops,
                      "test_accuracy": _pct(t.accuracy), "test_mean_flops": t.mean_flops,
                      "test_exit_counts": t.exit_counts})
    return curve


@dataclass
class Evidence:
    """What every section of the report reads: each model's logits on validation and test, the labels, FLOPs and
    the shared bootstrap."""

    logits: dict[str, np.ndarray]  # "val/NAME", "test/NAME", "val/labels", "test/labels"
    flops: dict[str, int]
    boot: Bootstrap
    exit_measure: str

    @property
    def teacher_flops(self) -> int:
        return self.flops["teacher"]

    def labels(self, split: str) -> np.ndarray:
        return self.logits[f"{split}/labels"]

    def correct(self, name: str, split: str = "test") -> np.ndarray:
        return self.logits[f"{split}/{name}"].argmax(-1) == self.labels(split)

    def scores(self, names: list[str], split: str, kinds: str | list[str]) -> CascadeScores:
        """Exit what-ifs of a cascade of `names`, each stage's logits combined as `kinds` says (reskd.cascade:
        "sum" for ResKD, "replace" for independent models, or one kind per stage, e.g. a fallback after a sum)."""
        stacked = np.stack([self.logits[f"{split}/{n}"] for n in names])
        return CascadeScores(running_logits(stacked, kinds), self.labels(split), [self.flops[n] for n in names],
                             self.exit_measure)


def analyse(recipe, data, stages, logits: dict, flops: dict, params: dict, environment: dict | None = None) -> dict:
    """The report as a dict (report.json); render_markdown and plot_pareto draw it. A run stopped after its
    teacher (Trainer.run(until="teacher")) reports the teacher alone."""
    ev = recipe.evaluation
    evidence = Evidence(logits, flops, Bootstrap(len(logits["test/labels"]), ev.bootstrap_samples, seed=recipe.seed),
                        ev.exit_measure)
    models = model_rows(evidence, stages, params)
    head = {"recipe": recipe.name, "dataset": data.name, "flops_note": FLOPS_NOTE,
            "teacher_flops": evidence.teacher_flops, "environment": environment or {}, "split": data.meta,
            "models": models}
    if "student" not in models:
        return head
    names = ["student"] + [s.name for s in stages if s.kind == "res_student"]
    val_scores, test_scores = evidence.scores(names, "val", "sum"), evidence.scores(names, "test", "sum")
    adaptive, chosen = calibrated(evidence, val_scores, test_scores, ev)
    on_test = test_scores.evaluate(chosen.thresholds)
    grid = kd_grid(models, stages, recipe)
    independent, independent_correct = independent_cascade(evidence, stages, recipe, chosen.mean_flops)
    return {
        **head,
        "cascade": {"stages": names, "stage_flops": [flops[n] for n in names],
                    "depths": cascade_depths(evidence, names, val_scores, test_scores)},
        "adaptive": adaptive, "adaptive_curve": _curve(val_scores, test_scores), "kd_grid": grid,
        "independent_cascade": independent,
        "differences": differences(evidence, on_test, test_scores.correct[-1], grid, independent_correct),
        "fallback": fallback(evidence, ev, names, independent["models"] if independent else None),
    }


def model_rows(evidence: Evidence, stages, params: dict) -> dict:
    rows = {}
    for s in stages:
        c = evidence.correct(s.name)
        rows[s.name] = {
            "kind": s.kind, "tag": s.spec.tag, "flops": evidence.flops[s.name], "params": params[s.name],
            "pct_teacher_flops": round(100 * evidence.flops[s.name] / evidence.teacher_flops, 3),
            "val_accuracy": _pct(evidence.correct(s.name, "val").mean()), "test_accuracy": _pct(c.mean()),
            "test_ci95": evidence.boot.interval(c), "history": s.history, "extra": s.extra,
        }
    return rows


def cascade_depths(evidence: Evidence, names: list[str], val: CascadeScores, test: CascadeScores) -> list[dict]:
    """The ResKD cascade with every sample running stages 0..k: z(k) = student + res1 + ... + res_k."""
    depths = []
    for k in range(len(names)):
        flops = int(test.cum_flops[k])
        depths.append({"stages": names[:k + 1], "flops": flops,
                       "pct_teacher_flops": round(100 * flops / evidence.teacher_flops, 3),
                       "val_accuracy": _pct(val.correct[k].mean()), "test_accuracy": _pct(test.correct[k].mean()),
                       "test_ci95": evidence.boot.interval(test.correct[k])})
    return depths


def calibrated(evidence: Evidence, val: CascadeScores, test: CascadeScores, ev) -> tuple[dict, ExitOutcome]:
    """Thresholds chosen on validation (minimum FLOPs within the accuracy target), measured once on test."""
    z = ev.bound_z if ev.bound == "upper" else 0.0
    chosen = val.calibrate(target_drop=ev.target_drop_pt / 100, z=z)
    adaptive = {
        "measure": ev.exit_measure, "thresholds": chosen.thresholds, "target_drop_pt": ev.target_drop_pt,
        "bound": ev.bound, "bound_z": z,
        "val": {"accuracy": _pct(chosen.accuracy), "full_cascade_accuracy": _pct(val.correct[-1].mean()),
                "mean_flops": chosen.mean_flops, "exit_counts": chosen.exit_counts,
                "allowed_drop_samples": ev.target_drop_pt / 100 * val.n, **val.drop_vs_full(chosen)},
        "test": _outcome(test.evaluate(chosen.thresholds), evidence.teacher_flops, list(test.stage_flops),
                         evidence.boot, test.correct[-1]),
    }
    return adaptive, chosen


def kd_grid(models: dict, stages, recipe) -> list[dict]:
    """The single KD-trained models by FLOPs (the student too, when the grid names its size)."""
    names = [s.name for s in stages if s.kind == "kd_baseline"]
    if any(e.spec == recipe.student.spec for e in recipe.baselines.kd_grid):
        names.insert(0, "student")
    keys = ("tag", "flops", "pct_teacher_flops", "val_accuracy", "test_accuracy", "test_ci95")
    return sorted(({"name": n, **{k: models[n][k] for k in keys}} for n in names), key=lambda r: r["flops"])


def independent_cascade(evidence: Evidence, stages, recipe,
                        adaptive_val_flops: float) -> tuple[dict, np.ndarray] | tuple[None, None]:
    """The confidence cascade of independently distilled models (no residual sum), over a range of budgets and
    at the adaptive ResKD cascade's validation FLOPs (the fair comparison point). -> (its report section, its
    test correctness at that point)."""
    order = [e.spec for e in recipe.baselines.independent_cascade]
    chosen = [s for s in stages if s.kind in ("student", "kd_baseline") and s.spec in order]
    if not order or len(chosen) < len(order):  # none asked for, or its models are not trained (yet)
        return None, None
    names = [s.name for s in sorted(chosen, key=lambda s: order.index(s.spec))]
    val, test = evidence.scores(names, "val", "replace"), evidence.scores(names, "test", "replace")
    matched = val.calibrate(flops_budget=adaptive_val_flops)
    on_test = test.evaluate(matched.thresholds)
    section = {"models": names, "stage_flops": [evidence.flops[n] for n in names], "curve": _curve(val, test),
               "at_adaptive_flops": {"thresholds": matched.thresholds,
                                     "test": _outcome(on_test, evidence.teacher_flops, list(test.stage_flops),
                                                      evidence.boot, None)}}
    return section, on_test.correct


# Budgets (percent of the teacher's FLOPs) at which the cascades with a teacher fallback are compared.
FALLBACK_BUDGETS_PCT = (10, 15, 20, 30, 40, 50)


def fallback(evidence: Evidence, ev, reskd: list[str], independent: list[str] | None) -> dict:
    """Each cascade with the teacher appended as a last stage whose logits replace the running logits (what
    `reskd export --fallback teacher` serves): the ResKD cascade, the independent-models cascade (when trained)
    and the student alone before the teacher. For each: the calibrated point (the recipe's rule, on validation)
    and the most accurate thresholds within each budget of FALLBACK_BUDGETS_PCT, measured on test; then the
    paired differences that say whether the cascade matches its teacher, beats the independent models at equal
    compute, and whether its res-students earn their place between student and teacher."""
    z = ev.bound_z if ev.bound == "upper" else 0.0
    cascades = {"ResKD + teacher": reskd, "student + teacher": ["student"]}
    if independent:
        cascades["independent + teacher"] = independent
    section, correct = {"budgets_pct": list(FALLBACK_BUDGETS_PCT), "cascades": {}}, {}
    for label, names in cascades.items():
        stages = [*names, "teacher"]
        kinds = ["sum" if label.startswith("ResKD") else "replace"] * len(names) + ["replace"]
        val, test = evidence.scores(stages, "val", kinds), evidence.scores(stages, "test", kinds)
        chosen = val.calibrate(target_drop=ev.target_drop_pt / 100, z=z)
        points = {"calibrated": (chosen.thresholds, chosen.mean_flops)}
        for pct in FALLBACK_BUDGETS_PCT:
            budget = val.calibrate(flops_budget=pct / 100 * evidence.teacher_flops)
            points[f"{pct}%"] = (budget.thresholds, budget.mean_flops)
        rows = {}
        for key, (thresholds, val_flops) in points.items():
            on_test = test.evaluate(thresholds)
            correct[label, key] = on_test.correct
            rows[key] = {"thresholds": thresholds, "val_mean_flops": val_flops,
                         "vs_teacher": {"delta_pt": _pct(on_test.accuracy - evidence.correct("teacher").mean()),
                                        "ci95": evidence.boot.interval(on_test.correct, evidence.correct("teacher"))},
                         "test": _outcome(on_test, evidence.teacher_flops, list(test.stage_flops), evidence.boot,
                                          test.correct[-1])}
        section["cascades"][label] = {"stages": stages, "combine": kinds, "points": rows}
    diffs = []

    def diff(label: str, a: np.ndarray, b: np.ndarray) -> None:
        diffs.append({"what": label, "delta_pt": _pct(a.mean() - b.mean()), "ci95": evidence.boot.interval(a, b)})

    if independent:
        for pct in FALLBACK_BUDGETS_PCT:
            diff(f"ResKD + teacher - independent + teacher, at {pct}% of the teacher's FLOPs (validation budget)",
                 correct["ResKD + teacher", f"{pct}%"], correct["independent + teacher", f"{pct}%"])
    # the res-students against nothing between student and teacher, at the calibrated point's validation FLOPs
    two_stage = evidence.scores(["student", "teacher"], "val", "replace")
    matched = two_stage.calibrate(flops_budget=section["cascades"]["ResKD + teacher"]["points"]["calibrated"][
        "val_mean_flops"])
    two_correct = evidence.scores(["student", "teacher"], "test", "replace").evaluate(matched.thresholds).correct
    diff("ResKD + teacher (calibrated) - student + teacher at its validation FLOPs",
         correct["ResKD + teacher", "calibrated"], two_correct)
    section["differences"] = diffs
    return section


def differences(evidence: Evidence, adaptive: ExitOutcome, full: np.ndarray, grid: list[dict],
                independent: np.ndarray | None) -> list[dict]:
    """Paired bootstrap intervals of the accuracy differences that matter (test set). adaptive: the calibrated
    cascade on test; full: its correctness with every stage run; independent: the independent cascade's
    correctness at equal FLOPs."""
    out = []

    def diff(label: str, a: np.ndarray, b: np.ndarray) -> None:
        out.append({"what": label, "delta_pt": _pct(a.mean() - b.mean()), "ci95": evidence.boot.interval(a, b)})

    diff("adaptive - teacher", adaptive.correct, evidence.correct("teacher"))
    diff("adaptive - student", adaptive.correct, evidence.correct("student"))
    diff("full cascade - student", full, evidence.correct("student"))
    diff("adaptive - full cascade", adaptive.correct, full)
    cheaper = [r for r in grid if r["flops"] <= adaptive.mean_flops]
    if cheaper:
        best = max(cheaper, key=lambda r: r["val_accuracy"])
        diff(f"adaptive - best KD single model with <= its FLOPs ({best['tag']}, chosen on val)", adaptive.correct,
             evidence.correct(best["name"]))
    if independent is not None:
        diff("adaptive - independent cascade at equal FLOPs", adaptive.correct, independent)
    return out


def _outcome(o: ExitOutcome, teacher_flops: int, stage_flops: list, boot: Bootstrap, full: np.ndarray | None) -> dict:
    full_flops = float(sum(stage_flops))
    out = {"accuracy": _pct(o.accuracy), "ci95": boot.interval(o.correct), "mean_flops": o.mean_flops,
           "pct_teacher_flops": round(100 * o.mean_flops / teacher_flops, 3),
           "flops_saved_vs_teacher_pct": round(100 * (1 - o.mean_flops / teacher_flops), 3),
           "flops_saved_vs_cascade_pct": round(100 * (1 - o.mean_flops / full_flops), 3),
           "exit_counts": o.exit_counts}
    if full is not None:
        out["full_cascade_accuracy"] = _pct(full.mean())
    return out


def _machine(env: dict) -> str:
    if not env:
        return "an unrecorded machine"
    return f"{env.get('device_name') or env.get('device')} ({env.get('device')}, {env.get('threads')} threads, torch {env.get('torch')})"


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def render_markdown(r: dict) -> str:
    m = r["models"]
    lines = [f"# {r['recipe']} — ResKD run report", "",
             f"Dataset {r['dataset']}: {r['split']['train_size']} train / {r['split']['val_size']} validation "
             f"(carved from train, never trained on) / {r['split']['test_size']} test.",
             f"{r['flops_note']}. Accuracy on the test set with 95% bootstrap intervals; thresholds and model "
             "choices from validation only.",
             f"Trained on {_machine(r['environment'])}; `train s` is each stage's training wall time there.", "",
             "## Models", "",
             "| model | role | FLOPs | % teacher | params | epochs | train s | val acc | test acc | 95% CI |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in m.items():
        seconds = v["extra"].get("train_seconds", "—")
        # A res-student outputs a correction, not a prediction: its accuracy is in the cascade table below.
        accuracy = ("(a residual: see the cascade) | | " if v["kind"] == "res_student" else
                    f"{v['val_accuracy']:.2f} | {v['test_accuracy']:.2f} | {_ci(v['test_ci95'])}")
        lines.append(f"| {name} ({v['tag']}) | {v['kind']} | {v['flops']:,} | {v['pct_teacher_flops']:.2f} | "
                     f"{v['params']:,} | {len(v['history'])} | {seconds} | {accuracy} |")
    if "cascade" not in r:  # a run stopped after its teacher
        return "\n".join(lines + [""])
    a = r["adaptive"]
    lines += ["", "## ResKD cascade", "", "| stages run | FLOPs | % teacher | val acc | test acc | 95% CI |",
              "|---|---:|---:|---:|---:|---|"]
    for d in r["cascade"]["depths"]:
        lines.append(f"| {' + '.join(d['stages'])} | {d['flops']:,} | {d['pct_teacher_flops']:.2f} | "
                     f"{d['val_accuracy']:.2f} | {d['test_accuracy']:.2f} | {_ci(d['test_ci95'])} |")
    t, v = a["test"], a["val"]
    lines += ["", "## Adaptive inference (calibrated on validation)", "",
              f"Exit measure `{a['measure']}`, thresholds {[round(x, 6) for x in a['thresholds']]}: minimum "
              f"validation FLOPs with accuracy ≥ full cascade − {a['target_drop_pt']} pt "
              f"({'paired upper bound, z=' + str(a['bound_z']) if a['bound'] == 'upper' else 'point estimate'}).",
              f"On validation that margin is {v['allowed_drop_samples']:.1f} of {v['n']} samples; the chosen "
              f"thresholds lose {v['lost']} and gain {v['gained']} samples against the full cascade.", "",
              "| | accuracy | 95% CI | mean FLOPs | % teacher | saved vs teacher | saved vs cascade | exits per stage |",
              "|---|---:|---|---:|---:|---:|---:|---|",
              f"| test | {t['accuracy']:.2f} | {_ci(t['ci95'])} | {t['mean_flops']:,.0f} | "
              f"{t['pct_teacher_flops']:.2f} | {t['flops_saved_vs_teacher_pct']:.2f}% | "
              f"{t['flops_saved_vs_cascade_pct']:.2f}% | {t['exit_counts']} |", ""]
    lines += ["## Differences (paired bootstrap, test)", "", "| comparison | Δ pt | 95% CI |", "|---|---:|---|"]
    for d in r["differences"]:
        lines.append(f"| {d['what']} | {d['delta_pt']:+.2f} | {_ci(d['ci95'])} |")
    lines += ["", "## KD single-model grid", "", "| model | FLOPs | % teacher | val acc | test acc | 95% CI |",
              "|---|---:|---:|---:|---:|---|"]
    for g in r["kd_grid"]:
        lines.append(f"| {g['tag']} | {g['flops']:,} | {g['pct_teacher_flops']:.2f} | {g['val_accuracy']:.2f} | "
                     f"{g['test_accuracy']:.2f} | {_ci(g['test_ci95'])} |")
    ind = r["independent_cascade"]
    if ind:
        it = ind["at_adaptive_flops"]["test"]
        lines += ["", "## Independent-students cascade (no residual sum)", "",
                  f"Models {' → '.join(ind['models'])}; at the adaptive ResKD cascade's validation FLOPs: test "
                  f"accuracy {it['accuracy']:.2f} {_ci(it['ci95'])} at {it['pct_teacher_flops']:.2f}% of teacher "
                  f"FLOPs, exits {it['exit_counts']}."]
    fb = r.get("fallback")
    if fb:
        lines += ["", "## With the teacher as a fallback stage (its logits replace the running logits)", "",
                  "Thresholds on validation: the recipe's rule (`calibrated`), or the most accurate within a FLOPs "
                  "budget; measured once on test.", "",
                  "| cascade | point | test acc | 95% CI | % teacher | − teacher, pt [95% CI] | exits per stage |",
                  "|---|---|---:|---|---:|---|---|"]
        for label, c in fb["cascades"].items():
            for key, p in c["points"].items():
                t, d = p["test"], p["vs_teacher"]
                lines.append(f"| {label} | {key} | {t['accuracy']:.2f} | {_ci(t['ci95'])} | "
                             f"{t['pct_teacher_flops']:.2f} | {d['delta_pt']:+.2f} {_ci(d['ci95'])} | "
                             f"{t['exit_counts']} |")
        lines += ["", "| comparison | Δ pt | 95% CI |", "|---|---:|---|"]
        for d in fb["differences"]:
            lines.append(f"| {d['what']} | {d['delta_pt']:+.2f} | {_ci(d['ci95'])} |")
    lines += ["", "## Adaptive curve (thresholds calibrated on validation per FLOPs budget)", "",
              "| val FLOPs | val acc | test FLOPs | % teacher | test acc | exits |", "|---:|---:|---:|---:|---:|---|"]
    for c in r["adaptive_curve"]:
        lines.append(f"| {c['val_mean_flops']:,.0f} | {c['val_accuracy']:.2f} | {c['test_mean_flops']:,.0f} | "
                     f"{100 * c['test_mean_flops'] / r['teacher_flops']:.2f} | {c['test_accuracy']:.2f} | "
                     f"{c['test_exit_counts']} |")
    lines += ["", "![accuracy vs compute](pareto.png)", ""]
    return "\n".join(lines)


def plot_pareto(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tf = r["teacher_flops"]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    curve = sorted(r["adaptive_curve"], key=lambda c: c["test_mean_flops"])
    ax.plot([100 * c["test_mean_flops"] / tf for c in curve], [c["test_accuracy"] for c in curve], "-o", ms=3,
            color="C0", label="ResKD adaptive (thresholds from validation)")
    depths = r["cascade"]["depths"]
    ax.plot([d["pct_teacher_flops"] for d in depths], [d["test_accuracy"] for d in depths], "s--", color="C0",
            alpha=0.6, label="ResKD cascade, every sample runs k stages")
    t = r["adaptive"]["test"]
    ax.plot([t["pct_teacher_flops"]], [t["accuracy"]], "*", ms=16, color="C3",
            label=f"calibrated operating point ({t['pct_teacher_flops']:.1f}% FLOPs)")
    grid = r["kd_grid"]
    if grid:
        ax.plot([g["pct_teacher_flops"] for g in grid], [g["test_accuracy"] for g in grid], "^-", color="C2",
                label="KD single models")
        for g in grid:
            ax.annotate(g["tag"], (g["pct_teacher_flops"], g["test_accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -8))
    if r["independent_cascade"]:
        ic = sorted(r["independent_cascade"]["curve"], key=lambda c: c["test_mean_flops"])
        ax.plot([100 * c["test_mean_flops"] / tf for c in ic], [c["test_accuracy"] for c in ic], "x-", color="C1",
                label="independent-students cascade (no residual sum)")
    for (label, c), color in zip((r.get("fallback") or {}).get("cascades", {}).items(), ("C4", "C5", "C6")):
        points = sorted((p["test"] for k, p in c["points"].items() if k != "calibrated"),
                        key=lambda t: t["pct_teacher_flops"])
        ax.plot([t["pct_teacher_flops"] for t in points], [t["accuracy"] for t in points], ".-", color=color,
                label=f"{label} (fallback), per FLOPs budget")
        t = c["points"]["calibrated"]["test"]
        ax.plot([t["pct_teacher_flops"]], [t["accuracy"]], "*", ms=11, color=color)
    teacher = r["models"]["teacher"]
    ax.axhline(teacher["test_accuracy"], color="k", lw=0.8, ls=":")
    ax.plot([100.0], [teacher["test_accuracy"]], "kD", label=f"teacher ({teacher['tag']})")
    ax.set_xscale("log")
    percent = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%")
    ax.xaxis.set_major_formatter(percent)
    ax.xaxis.set_minor_formatter(percent)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("mean FLOPs per sample, % of teacher (log scale; FLOPs = 2 x MACs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{r['recipe']}: accuracy vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
