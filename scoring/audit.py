"""`reskd score --audit`: the server's shadow audit and drift signal, written offline for every row.

Every answer given before the last stage is run again through the version's *audit model*, as the server's shadow
audit does (service/serving/audit.py), here for all of them rather than a share: `--audit-model NAME[:VERSION]`
when given, else the manifest's audit section (its fallback stage, or a version of the repository), else its
teacher.model. A stage of the version is run with CascadeRuntime.stage_logits on the scored runtime; a version runs
whole (every stage, no early exit) on its own runtime, from the image's pixels normalised as that version says.
Answers at the last stage are the cascade's final ones (in a cascade ending with its fallback, the reference itself)
and are not audited.

Every scored image also gets the energy score of its stage-0 logits (CascadeResult.score0, the server's drift
signal) and whether it is above the manifest's drift.p99, the validation split's 99th percentile.

The summary compares the agreement with what validation measured for the same answers: the mean, over the audited
rows, of audit.expected(default point, exit stage) (export/calibrate.py `references`), and the share of images
above the p99 with drift.above_p99 (about 1%).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reskd.manifest import Manifest, ManifestError, ModelRepository, parse_model_ref, sha256_file
from reskd.preprocess import normalise
from reskd.stats import wilson

from .errors import ScoreError

if TYPE_CHECKING:  # decode workers never load onnxruntime
    from reskd.device import Device
    from reskd.runtime import CascadeRuntime

DECODING = ("channels", "height", "width", "color", "resize")  # the InputSpec fields decoding depends on


@dataclass(frozen=True)
class AuditPlan:
    """What a job audits against (picklable: it travels to the workers and Ray actors)."""
    reference: str  # NAME:VERSION, or "stage S (NAME)" of the scored version
    last_stage: int  # answers given at stages before it are audited
    stage: int | None = None  # a stage of the scored version ...
    model_dir: str | None = None  # ... or the folder of another version
    model_sha256: str | None = None  # that version's manifest digest (job.json: a resumed job audits the same)
    # audit.expected(default point, s) per exit stage s; None: no validation figures for this reference
    expected: tuple[float | None, ...] | None = None
    no_expected: str = ""  # why there are none
    p99: float | None = None  # drift.p99: the OOD flag's threshold (None: the manifest has no drift section)
    above_p99: float | None = None  # drift.above_p99

    def job_record(self) -> dict:
        return {"reference": self.reference, "manifest_sha256": self.model_sha256}


def audit_plan(repo: ModelRepository, manifest: Manifest, audit_model: str | None) -> AuditPlan:
    """The audit reference of the version `manifest` describes, checked; ScoreError when it has none."""
    me = f"{manifest.name}:{manifest.version}"
    n = len(manifest.stages)
    if n < 2:
        raise ScoreError(f"--audit: {me} has a single stage, so every answer is its final one: there is nothing "
                         f"to audit")
    drift = manifest.drift
    common = dict(last_stage=n - 1, p99=drift.p99 if drift else None, above_p99=drift.above_p99 if drift else None)
    spec = manifest.audit
    default = manifest.operating_points.default if manifest.operating_points else "default"

    def figures() -> tuple[float | None, ...]:
        return tuple(spec.expected(default, s) for s in range(n))

    stage, named = manifest.audit_target()
    if audit_model is None and stage is not None:
        return AuditPlan(reference=f"stage {stage} ({manifest.stages[stage].name})", stage=stage,
                         expected=figures(), **common)
    ref = audit_model or named
    if ref is None:
        raise ScoreError(f"--audit: {me} has no audit reference (its manifest has no audit section and no "
                         f"teacher.model): name one with --audit-model NAME:VERSION")
    try:
        name, version = parse_model_ref(ref)
        folder, other = repo.load(name, version)
    except ManifestError as err:
        raise ScoreError(f"--audit-model: {err}" if audit_model else f"the audit reference of {me}: {err}") from None
    resolved = f"{other.name}:{other.version}"
    if any(getattr(other.input, f) != getattr(manifest.input, f) for f in DECODING) or other.labels != manifest.labels:
        raise ScoreError(f"the audit model {resolved} does not take the same images or answer with the same classes "
                         f"as {me}")
    if spec is not None and spec.model == resolved:
        expected, why = figures(), ""
    elif spec is not None:
        ours = spec.model or f"stage {spec.stage}"
        expected, why = None, f"the manifest's validation figures are against {ours}"
    else:
        expected, why = None, "the manifest has no audit section (`reskd calibrate --references-only` adds it)"
    return AuditPlan(reference=resolved, model_dir=str(folder), model_sha256=sha256_file(folder / "manifest.json"),
                     expected=expected, no_expected=why, **common)


class AuditRunner:
    """Where a cascade runs (a worker, the main process, a Ray actor): the audit model's class for images.
    model_dir: where the audit version's files are here (a Ray actor's copy), when not at plan.model_dir."""

    def __init__(self, plan: AuditPlan, runtime: CascadeRuntime, device: Device, model_dir: str | None = None):
        self.plan = plan
        self.runtime = runtime
        self.other = None
        if plan.stage is None:
            from reskd.runtime import CascadeRuntime

            self.other = CascadeRuntime(model_dir or plan.model_dir, device=device,
                                        check_folder_name=model_dir is None)
        self.spec = (self.other or runtime).manifest.input

    def classes(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels [k, C, H, W] -> the audit model's class for each (int64 [k])."""
        images = normalise(pixels, self.spec)
        if self.other is None:
            return self.runtime.stage_logits(self.plan.stage, images).argmax(-1).astype(np.int64)
        return self.other.run(images, early_exit=False).class_id


@dataclass
class AuditTally:
    """The summary's audit and drift lines, from the output rows."""
    plan: AuditPlan
    scored: int = 0  # images scored (no error)
    early: int = 0  # answers given before the last stage: every one is audited
    agreed: int = 0
    expected_sum: float = 0.0
    expected_n: int = 0
    ood: int = 0
    per_stage: list[int] = field(default_factory=list)

    def add(self, ok: pa.Table) -> None:
        """A block of rows that were scored (`error` null)."""
        self.scored += len(ok)
        agrees = ok.column("audit_agrees")
        audited = pc.is_valid(agrees).to_numpy(zero_copy_only=False)
        self.early += int(audited.sum())
        self.agreed += int(pc.sum(agrees).as_py() or 0)
        if self.plan.expected is not None:
            stages = ok.column("exit_stage").to_numpy()[audited]
            figures = np.asarray([np.nan if e is None else e for e in self.plan.expected], np.float64)[stages]
            known = ~np.isnan(figures)
            self.expected_sum += float(figures[known].sum())
            self.expected_n += int(known.sum())
        if self.plan.p99 is not None:
            self.ood += int(pc.sum(ok.column("ood")).as_py() or 0)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.early if self.early else None

    @property
    def expected_agreement(self) -> float | None:
        return self.expected_sum / self.expected_n if self.expected_n else None

    @property
    def ood_share(self) -> float | None:
        return self.ood / self.scored if self.scored and self.plan.p99 is not None else None

    def lines(self) -> list[str]:
        p = self.plan
        if not self.scored:
            return []
        if self.early:
            lo, hi = wilson(self.agreed, self.early)
            if self.expected_agreement is not None:
                missing = self.early - self.expected_n
                some = f" ({missing} at stages without a figure)" if missing else ""
                validation = f"validation {100 * self.expected_agreement:.2f}% for answers at the same stages{some}"
            else:
                validation = f"no validation reference ({p.no_expected})"
            audit = (f"audit: {self.early} of {self.scored} answers ({100 * self.early / self.scored:.1f}%) given "
                     f"before the last stage checked against {p.reference}: agreement "
                     f"{100 * self.agreement:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}%); {validation}")
        else:
            audit = f"audit: no answer given before the last stage, nothing checked against {p.reference}"
        if p.p99 is None:
            drift = ("drift: the manifest has no drift reference (`reskd calibrate --references-only` adds it): "
                     "ood_score written, ood left empty")
        else:
            lo, hi = wilson(self.ood, self.scored)
            drift = (f"drift: {100 * self.ood_share:.2f}% of images ({self.ood} of {self.scored}) above the "
                     f"validation p99 of the stage-0 energy score ({p.p99:.3f}) (95% CI {100 * lo:.2f}-"
                     f"{100 * hi:.2f}%); validation {100 * p.above_p99:.2f}%")
        return [audit, drift]


def version_files(version_dir: str | Path) -> list[str]:
    """The files of a version folder a runtime needs: its manifest and its stages' ONNX files."""
    from reskd.manifest import MANIFEST, load_manifest

    return [MANIFEST] + [s.file for s in load_manifest(Path(version_dir)).stages]
