"""`reskd export`: a run directory -> new versions in a model repository: the cascade (NAME: student and
res-students, one ONNX file each) and its teacher (NAME-teacher, a single stage), so one server can serve both; or
one network of the run alone (--model). Here the options are checked against the run and the repository and the
versions chosen; exporter.py builds them.

--combine: `sum` (ResKD, the default: the student and its res-students) or `replace` (a confidence cascade of
independent models, e.g. the run's KD baselines; --stages names them in order, by default the recipe's
`baselines.independent_cascade`). --fallback appends another network of the run (typically the teacher) as a last
stage whose logits replace the running logits. --precision: fp32 or fp16 (onnx.py).
"""

from __future__ import annotations

from pathlib import Path

from reskd.cascade import COMBINE_KINDS
from reskd.manifest import ManifestError, ModelRepository
from reskd.training.recipe import parse_recipe
from reskd.training.rundir import RunDir, RunDirError

from .errors import ExportError
from .exporter import export_cascade, export_network, open_run
from .onnx import PRECISIONS, Precision
from .runs import independent_stages


def export_run(run_dir: str | Path, repo: str | Path, name: str, version: int | None = None, *,
               target_drop_pt: float | None = None, flops_budget_pct: float | None = None,
               model: str | None = None, precision: Precision = "fp32", stages: list[str] | None = None,
               combine: str = "sum", fallback: str | None = None, log=print) -> dict:
    """model=None: the cascade as NAME and its teacher as NAME-teacher. model="kd-resnet8" (any checkpoint of the
    run): that one network alone as a one-stage NAME, measured against the run's teacher (for baselines).
    stages: the cascade's networks in order (default: the student and res-students for combine "sum", the recipe's
    independent-models cascade for "replace"). fallback: a network of the run (e.g. "teacher") appended as a last
    stage that replaces the running logits. precision: of every version written (the teacher's too, so comparisons
    stay fair)."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if combine not in COMBINE_KINDS:
        raise ExportError(f"combine must be one of {', '.join(COMBINE_KINDS)}, got {combine!r}")
    if model is not None and (stages or combine != "sum" or fallback):
        raise ExportError("--model exports one network: it takes neither --stages, --combine nor --fallback")
    repo = Path(repo)
    run = RunDir(run_dir)
    try:
        info = run.read_run_info()
    except RunDirError as err:
        raise ExportError(str(err)) from None
    recipe = parse_recipe(info["recipe"])
    named = [model] if model is not None else stages or []  # what the user named must exist; the recipe's
    if stages is None and model is None:                        # own stages are checked as the run is read
        stages = independent_stages(recipe) if combine == "replace" else \
            ["student"] + [f"res{k + 1}" for k in range(len(recipe.res_students))]
    for network in named:
        if not run.has_checkpoint(network) or network == "teacher":
            have = ", ".join(c for c in run.checkpoint_names() if c != "teacher") or "none"
            raise ExportError(f"the run has no model {network!r} to export (checkpoints: {have})")
    if model is None and len(set(stages)) != len(stages):
        raise ExportError(f"--stages names a network twice: {', '.join(stages)}")
    if fallback is not None and not run.has_checkpoint(fallback):
        raise ExportError(f"--fallback: the run has no network {fallback!r} (checkpoints: "
                          f"{', '.join(run.checkpoint_names()) or 'none'})")
    if fallback is not None and fallback in stages:
        raise ExportError(f"--fallback: {fallback} is already a stage of the cascade ({', '.join(stages)})")
    repository = ModelRepository(repo, create=True)
    cascade_version = version or repository.next_version(name)
    teacher_name = f"{name}-teacher"
    teacher_version = version or repository.next_version(teacher_name)
    targets = ((name, cascade_version),) if model else ((name, cascade_version), (teacher_name, teacher_version))
    for n, v in targets:  # before the run's networks are read: writing would refuse them anyway
        try:
            repository.check_new(n, v)
        except ManifestError as err:
            raise ExportError(str(err)) from None

    stage_names = [model] if model else stages
    try:
        exporter = open_run(run, info, recipe, stage_names + ([fallback] if fallback else []), log, precision)
    except RunDirError as err:
        raise ExportError(str(err)) from None
    if fallback in exporter.reads:
        raise ExportError(f"--fallback: {fallback} reads {exporter.reads[fallback]}, not the image: a fallback is a "
                          "network on its own")

    if model is not None:
        out, manifest = export_network(exporter, model, repo, name, cascade_version)
        return {"model": str(out), "model_manifest": manifest}
    if target_drop_pt is None and flops_budget_pct is None:
        target_drop_pt = recipe.evaluation.target_drop_pt
    (cascade_dir, cascade), (teacher_dir, teacher) = export_cascade(
        exporter, stage_names, repo, name, cascade_version, teacher_version, target_drop_pt=target_drop_pt,
        flops_budget_pct=flops_budget_pct, combine=combine, fallback=fallback)
    return {"cascade": str(cascade_dir), "teacher": str(teacher_dir), "cascade_manifest": cascade,
            "teacher_manifest": teacher}
