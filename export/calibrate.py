"""Exit thresholds chosen on the validation split through the cascade runtime (what is calibrated is exactly
what is served), then the test-set metrics measured the same way and written into the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reskd.exit_policy import CascadeScores
from reskd.manifest import CalibrationSpec, ExitSpec, Manifest, MeasuredMetrics, write_manifest
from reskd.runtime import CascadeRuntime


@dataclass
class EvalSet:
    """Normalised images (float32 [N, C, H, W]) and labels of one split."""

    images: np.ndarray
    labels: np.ndarray


def calibrate_version(version_dir: Path, val: EvalSet, test: EvalSet, *, target_drop_pt: float | None = None,
                      flops_budget_pct: float | None = None, bound: str = "upper", z: float = 1.0,
                      runtime: CascadeRuntime | None = None) -> Manifest:
    """Choose thresholds on `val`, measure on `test`, rewrite the manifest; returns the new manifest. The runtime
    (made here if not given) serves the new thresholds afterwards."""
    if (target_drop_pt is None) == (flops_budget_pct is None):
        raise ValueError("give exactly one of target_drop_pt or flops_budget_pct")
    rt = runtime or CascadeRuntime(version_dir)
    manifest = rt.manifest
    scores = CascadeScores(rt.all_stage_logits(val.images), val.labels, rt.stage_flops, manifest.exit.measure)
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
    rt.manifest = manifest.model_copy(update={"exit": exit_spec, "calibration": calibration})
    metrics = measure_test(rt, test, manifest.teacher.flops, manifest.teacher.accuracy)  # under the new thresholds
    rt.manifest = rt.manifest.model_copy(update={"metrics": metrics})
    write_manifest(version_dir, rt.manifest)
    return rt.manifest


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
