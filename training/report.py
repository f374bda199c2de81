"""The run's evidence: accuracy with bootstrap intervals, FLOPs (2 x MACs at batch 1) and parameters of every model,
each cumulative cascade depth, the adaptive cascade at thresholds calibrated on validation, the adaptive curve, the
KD single-model grid and the independent-students cascade -> report.json, report.md, pareto.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reskd.exit_policy import CascadeScores, ExitOutcome

FLOPS_NOTE = ("FLOPs per sample = 2 x multiply-accumulates of one forward pass at batch 1, counted by "
              "torch.utils.flop_counter (convolutions and linear layers)")


class Bootstrap:
    """Paired percentile bootstrap over test samples: one set of resampling indices shared by every statistic."""

    def __init__(self, n: int, samples: int, seed: int = 0):
        self.idx = np.random.default_rng(seed).integers(0, n, size=(samples, n), dtype=np.int32)

    def interval(self, correct: np.ndarray, minus: np.ndarray | None = None) -> list[float]:
        stat = correct.astype(np.float32)
        if minus is not None:
            stat = stat - minus.astype(np.float32)
        means = np.empty(len(self.idx))
        for i in range(0, len(self.idx), 100):  # chunks keep memory flat on ImageNet-size test sets
            means[i:i + 100] = stat[self.idx[i:i + 100]].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        return [round(float(lo) * 100, 3), round(float(hi) * 100, 3)]


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


def write_report(out: Path, recipe, data, stages, logits: dict, flops: dict, params: dict,
                 environment: dict | None = None) -> dict:
    ev = recipe.evaluation
    y_val, y_test = logits["val/labels"], logits["test/labels"]
    boot = Bootstrap(len(y_test), ev.bootstrap_samples, seed=recipe.seed)
    teacher_flops = flops["teacher"]
    by_name = {s.name: s for s in stages}

    def correct(name: str, split: str = "test") -> np.ndarray:
        return logits[f"{split}/{name}"].argmax(-1) == (y_test if split == "test" else y_val)

    models = {}
    for s in stages:
        c = correct(s.name)
        models[s.name] = {
            "kind": s.kind, "tag": s.spec.tag, "flops": flops[s.name], "params": params[s.name],
            "pct_teacher_flops": round(100 * flops[s.name] / teacher_flops, 3),
            "val_accuracy": _pct(correct(s.name, "val").mean()), "test_accuracy": _pct(c.mean()),
            "test_ci95": boot.interval(c), "history": s.history, "extra": s.extra,
        }

    # -- the ResKD cascade: running logits z(k) = student + res1 + ... + res_k --------------------------------------
    names = ["student"] + [s.name for s in stages if s.kind == "res_student"]
    stage_flops = [flops[n] for n in names]
    cum = {split: np.cumsum(np.stack([logits[f"{split}/{n}"].astype(np.float64) for n in names]), axis=0)
           for split in ("val", "test")}
    depths = []
    for k in range(len(names)):
        c = cum["test"][k].argmax(-1) == y_test
        depths.append({"stages": names[:k + 1], "flops": int(sum(stage_flops[:k + 1])),
                       "pct_teacher_flops": round(100 * sum(stage_flops[:k + 1]) / teacher_flops, 3),
                       "val_accuracy": _pct((cum["val"][k].argmax(-1) == y_val).mean()),
                       "test_accuracy": _pct(c.mean()), "test_ci95": boot.interval(c)})

    val_scores = CascadeScores(cum["val"], y_val, stage_flops, ev.exit_measure)
    test_scores = CascadeScores(cum["test"], y_test, stage_flops, ev.exit_measure)
    z = ev.bound_z if ev.bound == "upper" else 0.0
    chosen = val_scores.calibrate(target_drop=ev.target_drop_pt / 100, z=z)
    on_test = test_scores.evaluate(chosen.thresholds)
    full_test = test_scores.correct[-1]
    adaptive = {
        "measure": ev.exit_measure, "thresholds": chosen.thresholds, "target_drop_pt": ev.target_drop_pt,
        "bound": ev.bound, "bound_z": z,
        "val": {"accuracy": _pct(chosen.accuracy), "full_cascade_accuracy": _pct(val_scores.correct[-1].mean()),
                "mean_flops": chosen.mean_flops, "exit_counts": chosen.exit_counts,
                "allowed_drop_samples": ev.target_drop_pt / 100 * val_scores.n, **val_scores.drop_vs_full(chosen)},
        "test": _outcome(on_test, teacher_flops, stage_flops, boot, full_test),
    }

    # -- baselines ----------------------------------------------------------------------------------------------
    grid_names = [n for n, s in by_name.items() if s.kind == "kd_baseline"]
    if any(e.spec == recipe.student.spec for e in recipe.baselines.kd_grid):
        grid_names.insert(0, "student")
    kd_grid = sorted(({"name": n, **{k: models[n][k] for k in ("tag", "flops", "pct_teacher_flops", "val_accuracy",
                                                                "test_accuracy", "test_ci95")}}
                      for n in grid_names), key=lambda r: r["flops"])

    independent = None
    if recipe.baselines.independent_cascade:
        tags = {e.spec for e in recipe.baselines.independent_cascade}
        ind_names = [n for n, s in by_name.items() if s.kind in ("student", "kd_baseline") and s.spec in tags]
        ind_names.sort(key=lambda n: [e.spec for e in recipe.baselines.independent_cascade].index(by_name[n].spec))
        ind_flops = [flops[n] for n in ind_names]
        own = {split: np.stack([logits[f"{split}/{n}"] for n in ind_names]) for split in ("val", "test")}
        ind_val = CascadeScores(own["val"], y_val, ind_flops, ev.exit_measure)
        ind_test = CascadeScores(own["test"], y_test, ind_flops, ev.exit_measure)
        # The fair comparison point: the independent cascade given the adaptive ResKD cascade's validation FLOPs.
        matched = ind_val.calibrate(flops_budget=chosen.mean_flops)
        matched_test = ind_test.evaluate(matched.thresholds)
        independent = {"models": ind_names, "stage_flops": ind_flops,
                       "curve": _curve(ind_val, ind_test),
                       "at_adaptive_flops": {"thresholds": matched.thresholds,
                                             "test": _outcome(matched_test, teacher_flops, ind_flops, boot, None)}}

    # -- differences that matter, paired ------------------------------------------------------------------------
    diffs = []

    def diff(label: str, a: np.ndarray, b: np.ndarray) -> None:
        diffs.append({"what": label, "delta_pt": _pct(a.mean() - b.mean()), "ci95": boot.interval(a, b)})

    diff("adaptive - teacher", on_test.correct, correct("teacher"))
    diff("adaptive - student", on_test.correct, correct("student"))
    diff("full cascade - student", full_test, correct("student"))
    diff("adaptive - full cascade", on_test.correct, full_test)
    cheaper = [r for r in kd_grid if r["flops"] <= on_test.mean_flops]
    if cheaper:
        best = max(cheaper, key=lambda r: r["val_accuracy"])
        diff(f"adaptive - best KD single model with <= its FLOPs ({best['tag']}, chosen on val)", on_test.correct,
             correct(best["name"]))
    if independent:
        diff("adaptive - independent cascade at equal FLOPs", on_test.correct,
             ind_test.evaluate(independent["at_adaptive_flops"]["thresholds"]).correct)

    report = {
        "recipe": recipe.name, "dataset": data.name, "flops_note": FLOPS_NOTE, "teacher_flops": teacher_flops,
        "environment": environment or {},
        "split": data.meta, "models": models, "cascade": {"stages": names, "stage_flops": stage_flops,
                                                           "depths": depths},
        "adaptive": adaptive, "adaptive_curve": _curve(val_scores, test_scores), "kd_grid": kd_grid,
        "independent_cascade": independent, "differences": diffs,
    }
    (out / "report.md").write_text(render_markdown(report))
    plot_pareto(report, out / "pareto.png")
    return report


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
    m, a = r["models"], r["adaptive"]
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
