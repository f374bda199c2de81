"""`reskd compose`: a new cascade version from versions already in a model repository, without the run that
trained them: the first stages of a cascade and a one-stage model (typically its teacher) appended as a fallback
stage that replaces the running logits, calibrated through the runtime on the cascade's validation split.

The stage files are copied byte for byte (their sha256 is checked on load as always), so each stage computes what
it computed in its own version and its parity against PyTorch, measured when that version was exported, still
holds; the manifest carries those figures over. What cannot be carried over is the exit-stage agreement under the
new thresholds (it needs the PyTorch networks): it is left out.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from reskd.device import Device
from reskd.manifest import (ExitSpec, Manifest, ManifestError, ModelRepository, ParitySpec, TeacherSpec,
                            parse_model_ref, write_manifest)
from reskd.runtime import CascadeRuntime

from .calibrate import calibrate_version
from .errors import ExportError
from .runs import eval_sets


def _ref(manifest: Manifest) -> str:
    return f"{manifest.name}:{manifest.version}"


def _same(base: Manifest, fallback: Manifest) -> None:
    """The fallback answers the same question as the cascade: same classes, same preprocessing, the same data
    (so its validation split is the cascade's), the same arithmetic."""
    for field in ("labels", "input", "precision"):
        if getattr(base, field) != getattr(fallback, field):
            raise ExportError(f"--fallback: {_ref(fallback)}'s {field} differs from {_ref(base)}'s: a fallback must "
                              "classify the same classes from the same input")
    if base.source is None or fallback.source is None or base.source.data != fallback.source.data:
        raise ExportError(f"--fallback: {_ref(fallback)} was not trained on {_ref(base)}'s data (source.data "
                          "differs or is missing), so the cascade's validation split may be its training data")


def _teacher(base: Manifest, fallback: Manifest, fallback_ref: str) -> TeacherSpec:
    """The cascade's teacher, naming its model version: the one the cascade names, else the fallback when it is
    that teacher (the same FLOPs and the same test accuracy as the cascade's teacher figures)."""
    teacher = base.teacher.model_copy()
    is_teacher = (fallback.stages[0].flops == base.teacher.flops and fallback.metrics is not None
                  and fallback.metrics.adaptive_accuracy == base.teacher.accuracy)
    if teacher.model is None and is_teacher:
        teacher.model = fallback_ref
    return teacher


def compose_fallback(repo: str | Path, name: str, *, cascade: str, fallback: str, keep: int | None = None,
                     version: int | None = None, target_drop_pt: float | None = None,
                     flops_budget_pct: float | None = None, log=print) -> tuple[Path, Manifest]:
    """REPO/NAME/VERSION: the first `keep` stages of `cascade` (NAME[:VERSION], default all) and the one-stage model
    `fallback` as a replacing last stage, calibrated on validation (target drop, default 0.1 pt, or FLOPs budget)
    and measured on test. Nothing is written unless every check passes."""
    if target_drop_pt is not None and flops_budget_pct is not None:
        raise ExportError("give a target drop or a FLOPs budget, not both")
    repository = ModelRepository(repo)
    base_dir, base = repository.load(*parse_model_ref(cascade))
    fallback_dir, fb = repository.load(*parse_model_ref(fallback))
    if len(fb.stages) != 1:
        raise ExportError(f"--fallback: {_ref(fb)} has {len(fb.stages)} stages; a fallback is a one-stage model")
    keep = len(base.stages) if keep is None else keep
    if not 1 <= keep <= len(base.stages):
        raise ExportError(f"--keep: {_ref(base)} has {len(base.stages)} stages; keep 1 to {len(base.stages)}, "
                          f"got {keep}")
    _same(base, fb)
    kept = base.stages[:keep]
    extra = fb.stages[0]
    if extra.name in {s.name for s in kept}:
        raise ExportError(f"--fallback: its stage is named {extra.name!r}, like a stage of {_ref(base)}")
    version = version or repository.next_version(name)
    repository.check_new(name, version)  # before the images are read: writing would refuse it anyway
    val, test = eval_sets(base.source.data, base.input)
    log(f"validation {len(val.labels)} / test {len(test.labels)} images")

    def build(folder: Path) -> Manifest:
        stages = []
        for i, (stage, source) in enumerate([*((s, base_dir) for s in kept), (extra, fallback_dir)]):
            file = f"stage{i}-{stage.name}.onnx"
            shutil.copyfile(source / stage.file, folder / file)
            stages.append(stage.model_copy(update={"file": file}))
        stages[-1] = stages[-1].model_copy(update={"combine": "replace"})
        parity = None
        if base.parity is not None and fb.parity is not None:
            parity = ParitySpec(**{s.name: base.parity.stages[s.name] for s in kept},
                                **{extra.name: fb.parity.stages[extra.name]})
        source = base.source.model_copy(update={
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "composed_from": [f"{_ref(base)} stages 0..{keep - 1}", _ref(fb)]})
        optional = {"precision": base.precision} if base.precision != "fp32" else {}
        manifest = Manifest(name=name, version=version, labels=base.labels, input=base.input, stages=stages,
                            teacher=_teacher(base, fb, _ref(fb)),
                            exit=ExitSpec(measure=base.exit.measure, thresholds=[1.0] * keep), source=source,
                            combine=base.combine, **optional, **({"parity": parity} if parity else {}))
        write_manifest(folder, manifest)
        previous = base.calibration
        bound = (previous and previous.bound) or "upper"
        z = previous.z if previous and previous.z is not None else 1.0
        target = target_drop_pt if target_drop_pt is not None or flops_budget_pct is not None else 0.1
        rt = CascadeRuntime(folder, device=Device.cpu(), check_folder_name=False)  # as export calibrates
        return calibrate_version(folder, val, test, target_drop_pt=target, flops_budget_pct=flops_budget_pct,
                                 bound=bound, z=z, runtime=rt)

    out, manifest = repository.write_version(name, version, build)
    try:
        repository.load(name, version)  # final check: as a server would load it
    except ManifestError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out, manifest
