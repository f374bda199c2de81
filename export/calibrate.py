"""Exit thresholds chosen on the validation split through the cascade runtime (what is calibrated is exactly
what is served), then the test-set metrics measured the same way and written into the manifest."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reskd.device import Device
from reskd.exit_policy import CascadeScores, ExitOutcome, confidence, energy, exit_stages
from reskd.manifest import (AuditSpec, CalibrationSpec, DriftSpec, ExitSpec, Manifest, ManifestError,
                            MeasuredMetrics, OperatingPoint, OperatingPoints, parse_model_ref, write_manifest)
from reskd.runtime import CascadeRuntime
from reskd.stats import Bootstrap

# The FLOPs budgets (percent of the teacher's) at which the operating-point curve is calibrated, those between the
# cascade's cheapest and dearest policy: a few points per doubling of compute, enough to move along the curve in
# small steps, few enough to calibrate in seconds. A point's id names its budget ("budget-20"), so it stays the
# same point when the version is recalibrated.
CURVE_BUDGETS_PCT = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 22.5, 25, 30, 35, 40, 45, 50, 60,
                     70, 80, 90, 100, 120, 150, 200, 300)
# The levels at which the drift reference stores the validation distribution of stage 0's energy score: every
# percentile, and finer in the upper tail, where inputs unlike the training data land.
DRIFT_LEVELS = tuple(sorted({*(i / 100 for i in range(101)), 0.995, 0.999}))
# Resamples of the paired bootstrap behind every point's interval against the full cascade (seeded: the same
# manifest every time).
BOOTSTRAP_SAMPLES = 1000


@dataclass
class EvalSet:
    """Normalised images (float32 [N, C, H, W]) and labels of one split."""

    images: np.ndarray
    labels: np.ndarray


def calibrate_version(version_dir: Path, val: EvalSet, test: EvalSet, *, target_drop_pt: float | None = None,
                      flops_budget_pct: float | None = None, bound: str = "upper", z: float = 1.0,
                      runtime: CascadeRuntime | None = None, audit_model: str | None = None) -> Manifest:
    """Choose thresholds on `val`, measure on `test`, store the audit and drift references (`references`), rewrite
    the manifest; returns the new manifest. The runtime (made here if not given) serves the new thresholds
    afterwards."""
    if (target_drop_pt is None) == (flops_budget_pct is None):
        raise ValueError("give exactly one of target_drop_pt or flops_budget_pct")
    rt = runtime or CascadeRuntime(version_dir)
    manifest = rt.manifest
    running = rt.all_stage_logits(val.images)  # the thresholds and the references are chosen on the same logits
    scores = CascadeScores(running, val.labels, rt.stage_flops, manifest.exit.measure)
    if target_drop_pt is not None:
        z = z if bound == "upper" else 0.0
        chosen = scores.calibrate(target_drop=target_drop_pt / 100, z=z)
        rule = {"target_drop_pt": target_drop_pt, "bound": bound, "z": z}
    else:
        chosen = scores.calibrate(flops_budget=flops_budget_pct / 100 * manifest.teacher.flops)
        rule = {"flops_budget_pct_teacher": flops_budget_pct}
    calibration = CalibrationSpec(
        **rule, split="validation", accuracy=chosen.accuracy,
        full_cascade_accuracy=float(scores.correct[-1].mean()), mean_flops=chosen.mean_flops,
        exit_counts=chosen.exit_counts, **scores.drop_vs_full(chosen))
    exit_spec = ExitSpec(measure=manifest.exit.measure, thresholds=[float(t) for t in chosen.thresholds])
    points = operating_points(scores, chosen, manifest.teacher.flops)
    rt.manifest = manifest.model_copy(update={"exit": exit_spec, "calibration": calibration,
                                              "operating_points": points})
    metrics = measure_test(rt, test, manifest.teacher.flops, manifest.teacher.accuracy)  # under the new thresholds
    rt.manifest = rt.manifest.model_copy(update={"metrics": metrics})
    audit, drift = references(rt, val, audit_model, running)
    rt.manifest = rt.manifest.model_copy(update={"audit": audit, "drift": drift})
    write_manifest(version_dir, rt.manifest)
    return rt.manifest


def store_references(version_dir: Path, val: EvalSet, audit_model: str | None = None) -> Manifest:
    """Only the audit and drift references of a calibrated version, on `val`: thresholds, curve and test figures
    stay as they are (`reskd calibrate --references-only`)."""
    rt = CascadeRuntime(version_dir, device=Device.cpu())
    audit, drift = references(rt, val, audit_model)
    rt.manifest = rt.manifest.model_copy(update={"audit": audit, "drift": drift})
    write_manifest(version_dir, rt.manifest)
    return rt.manifest


def audit_reference(rt: CascadeRuntime, audit_model: str | None = None) -> tuple[str | None, int | None]:
    """What the server's shadow audit compares this version's early answers with: `audit_model` (NAME:VERSION)
    when given; else the version's own fallback stage, a last stage that replaces the running logits and costs the
    teacher's FLOPs (the teacher itself); else the version its manifest's audit section named before (a
    recalibration keeps it); else the manifest's teacher.model; else nothing, (None, None)."""
    m = rt.manifest
    if audit_model is not None:
        return audit_model, None
    last = len(m.stages) - 1
    if last > 0 and m.stage_combine[last] == "replace" and m.stages[last].flops == m.teacher.flops:
        return None, last
    if m.audit is not None and m.audit.model is not None:
        return m.audit.model, None
    return m.teacher.model, None


def references(rt: CascadeRuntime, val: EvalSet, audit_model: str | None = None, running: np.ndarray | None = None
               ) -> tuple[AuditSpec | None, DriftSpec]:
    """The audit and drift references of the version `rt` runs, measured on the validation split `val` through the
    runtime at every operating point of its manifest (the default point alone when it stores none):
    - audit: how often each point's answers at each stage agree with the audit reference (audit_reference; None
      when the version has none). A reference model NAME:VERSION is read from the version's own repository: one
      named by `audit_model` must be there (ManifestError); one the manifest names and the repository lacks (a
      version copied alone) leaves the audit section out, with a warning.
    - drift: the distribution of the energy score of stage 0's logits, and the mean exit confidence per point."""
    m = rt.manifest
    if running is None:  # the running logits after every stage [S, N, C] (calibration passes its own)
        running = rt.all_stage_logits(val.images)
    conf = confidence(running, m.exit.measure)
    classes = running.argmax(-1)
    n_stages, n = conf.shape
    points = [(p.id, p.thresholds, p.max_stage) for p in m.operating_points.points] if m.operating_points else \
        [("default", m.exit.thresholds, n_stages - 1)]
    exits = {pid: exit_stages(conf, thresholds, max_stage) for pid, thresholds, max_stage in points}
    rows = np.arange(n)

    score = energy(running[0])
    quantiles = np.quantile(score, DRIFT_LEVELS)
    p99 = float(np.quantile(score, 0.99))
    drift = DriftSpec(split="validation", n=n, levels=list(DRIFT_LEVELS), quantiles=quantiles.tolist(), p99=p99,
                      above_p99=float((score > p99).mean()),
                      exit_confidence={pid: float(conf[e, rows].mean()) for pid, e in exits.items()})

    model, stage = audit_reference(rt, audit_model)
    if model is None and stage is None:
        return None, drift
    if stage is not None:  # a replacing stage: its running logits are its own
        reference = running[stage].argmax(-1)
    else:
        name, version = parse_model_ref(model)
        folder = rt.path.parent.parent / name / str(version)
        if (version is None or not folder.is_dir()) and audit_model is None:
            warnings.warn(f"{m.name}:{m.version}: its audit model {model} is not in {rt.path.parent.parent}; the "
                          f"manifest gets no audit section (--audit-model NAME:VERSION names one that is)")
            return None, drift
        if version is None or not folder.is_dir():
            raise ManifestError(f"the audit reference {model} is not a version of the repository "
                                f"{rt.path.parent.parent} (give NAME:VERSION of a version there)")
        other = CascadeRuntime(folder, device=Device.cpu())
        if other.input_shape != rt.input_shape or other.manifest.labels != m.labels:
            raise ManifestError(f"the audit reference {model} does not take the same images or answer with the "
                                f"same classes as {m.name}:{m.version}")
        reference = other.run(val.images, early_exit=False).class_id
    agree = classes == reference[None, :]  # [S, N]

    def at_point(e: np.ndarray) -> list[float | None]:
        return [None if s == stage or not (e == s).any() else float(agree[s, e == s].mean())
                for s in range(n_stages)]

    audit = AuditSpec(model=model, stage=stage, split="validation", n=n,
                      stage_agreement=agree.mean(axis=1).tolist(),
                      points={pid: at_point(e) for pid, e in exits.items()})
    return audit, drift


def operating_points(scores: CascadeScores, chosen: ExitOutcome, teacher_flops: int) -> OperatingPoints:
    """The curve of `scores` (a split's exits what-ifs) with `chosen` as the default point, as the manifest
    stores it."""
    budgets = [pct / 100 * teacher_flops for pct in CURVE_BUDGETS_PCT]
    curve = scores.operating_curve(chosen.thresholds, budgets, [f"budget-{pct:g}" for pct in CURVE_BUDGETS_PCT])
    boot = Bootstrap(scores.n, BOOTSTRAP_SAMPLES)
    full = scores.correct[-1]
    return OperatingPoints(split="validation", n=scores.n, default="default", points=[OperatingPoint(
        id=p.id, max_stage=p.max_stage, thresholds=[float(t) for t in p.outcome.thresholds],
        accuracy=p.outcome.accuracy, diff_vs_full_pt=round(100 * (p.outcome.accuracy - float(full.mean())), 3),
        diff_ci95_pt=boot.interval(p.outcome.correct, minus=full), mean_flops=p.outcome.mean_flops,
        pct_teacher_flops=100 * p.outcome.mean_flops / teacher_flops,
        exit_fractions=[c / scores.n for c in p.outcome.exit_counts]) for p in curve])


def measure_test(rt: CascadeRuntime, test: EvalSet, teacher_flops: int,
                 teacher_accuracy: float | None) -> MeasuredMetrics:
    result = rt.run(test.images)
    every = rt.all_stage_logits(test.images)
    full_flops = float(rt.cum_flops[-1])
    mean_flops = float(result.flops.mean())
    return MeasuredMetrics(
        split="test", n=len(test.labels), teacher_accuracy=teacher_accuracy,
        stage_accuracy=[float((every[s].argmax(-1) == test.labels).mean()) for s in range(rt.num_stages)],
        adaptive_accuracy=float((result.class_id == test.labels).mean()), mean_flops=mean_flops,
        pct_teacher_flops=100 * mean_flops / teacher_flops,
        flops_saved_vs_teacher_pct=100 * (1 - mean_flops / teacher_flops),
        flops_saved_vs_cascade_pct=100 * (1 - mean_flops / full_flops),
        exit_counts=np.bincount(result.exit_stage, minlength=rt.num_stages).tolist())
