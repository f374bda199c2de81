"""The model repository contract (docs/design.md, "Model repository"): REPO/NAME/VERSION/manifest.json plus one
ONNX file per stage. Loading verifies every field (naming the one at fault) and every file's sha256 before anything
runs. Manifests are written through the same typed model they are read with (write_manifest), so what export and
calibration write is what the server and scoring read; unknown fields are kept as they are."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .files import write_atomic
from .validation import describe

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A model version cannot be used as it is; the message names the file or field and what is wrong."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color: Literal["L", "RGB"]
    # How an image of another size is brought to height x width: "bilinear" stretches it; "fit-center" scales the
    # shorter side then centre-crops (aspect kept).
    resize: Literal["bilinear", "fit-center"] = "bilinear"
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _consistent(self):
        if (self.color == "L") != (self.channels == 1):
            raise ValueError(f"color {self.color!r} does not match channels {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


IMAGES = "images"  # the source every stage reads unless its manifest entry says otherwise


class StageInput(BaseModel):
    """One input of a stage's ONNX graph and what feeds it: "images" (the normalised batch) or "STAGE.OUTPUT", a
    named output of an earlier stage, carried by the runtime for the samples that reach this stage."""
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    source: str = Field(pattern=r"^(images|.+\.[^.]+)$")


class StageOutput(BaseModel):
    """A named float32 output of a stage's graph besides `logits`, [N, *shape], that later stages may read."""
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    shape: list[int] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape):
        if any(d < 1 for d in shape):
            raise ValueError("every dimension must be >= 1")
        return shape


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    flops: int = Field(gt=0)  # this stage's own work (not that of the stages whose outputs it reads)
    # Absent: the stage reads the images and gives logits only (every manifest before stage inputs existed).
    inputs: list[StageInput] = Field(default_factory=lambda: [StageInput(name=IMAGES, source=IMAGES)], min_length=1)
    outputs: list[StageOutput] = Field(default_factory=list)
    # How this stage's logits make the running logits ("sum": added to them; "replace": they become them, e.g. a
    # fallback teacher after summed stages). Absent: the cascade's `combine`.
    combine: Literal["sum", "replace"] | None = None

    @model_validator(mode="after")
    def _names(self):
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"inputs: names must be unique, got {names}")
        outs = [o.name for o in self.outputs]
        if "logits" in outs or len(set(outs)) != len(outs):
            raise ValueError(f"outputs: names must be unique and not 'logits' (always an output), got {outs}")
        return self

    @property
    def sources(self) -> list[str]:
        return [i.source for i in self.inputs]


MODEL_REF = r"^[A-Za-z0-9][A-Za-z0-9._-]*:[1-9][0-9]*$"  # NAME:VERSION of a model version in a repository


def _model_ref(ref: str) -> str:
    if not re.fullmatch(MODEL_REF, ref):
        raise ValueError(f"{ref!r} should be NAME:VERSION, e.g. fashion-mnist-teacher:2")
    return ref


ModelRef = Annotated[str, AfterValidator(_model_ref)]  # a manifest field naming another version


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    flops: int = Field(gt=0)
    accuracy: float | None = None
    # The teacher as a model version of the repository, NAME:VERSION (the audit's reference); absent in older
    # manifests.
    model: ModelRef | None = None


class ExitSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    measure: Literal["max_prob", "margin", "entropy"]
    thresholds: list[float]

    @model_validator(mode="after")
    def _range(self):
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError("thresholds must lie in [0, 1]")
        return self


class MeasuredMetrics(BaseModel):
    """What the version does on the test set, measured through the runtime (export, calibrate)."""
    model_config = ConfigDict(extra="allow")
    split: str
    n: int
    teacher_accuracy: float | None
    stage_accuracy: list[float]  # every sample runs stages 0..s
    adaptive_accuracy: float
    mean_flops: float
    pct_teacher_flops: float
    flops_saved_vs_teacher_pct: float
    flops_saved_vs_cascade_pct: float
    exit_counts: list[int]


class SourceSpec(BaseModel):
    """Where the version came from; `data` (the recipe's data section) rebuilds its validation split."""
    model_config = ConfigDict(extra="allow")
    run: str
    recipe: str
    data: dict
    exported: str
    torch: str | None = None


class CalibrationSpec(BaseModel):
    """How the thresholds were chosen, and what they gave on the validation split."""
    model_config = ConfigDict(extra="allow")
    target_drop_pt: float | None = None  # minimise FLOPs with accuracy >= full cascade - this
    bound: Literal["upper", "point"] | None = None
    z: float | None = None
    flops_budget_pct_teacher: float | None = None  # or: maximise accuracy within this budget
    split: str
    n: int
    accuracy: float
    full_cascade_accuracy: float
    mean_flops: float
    exit_counts: list[int]
    lost: int  # samples the full cascade gets right and the adaptive one wrong
    gained: int
    net_samples: int


class OperatingPoint(BaseModel):
    """One point of a version's accuracy/compute curve, measured on the validation split through the runtime: run
    with these thresholds and this last stage, the split gives exactly these figures."""
    model_config = ConfigDict(extra="allow")
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    max_stage: int = Field(ge=0)
    thresholds: list[float]  # one per stage but the last (those from max_stage on are never consulted)
    accuracy: float = Field(ge=0, le=1)
    # accuracy minus the full cascade's (every stage run) in points, and its paired bootstrap 95% interval
    diff_vs_full_pt: float
    diff_ci95_pt: list[float] = Field(min_length=2, max_length=2)
    mean_flops: float = Field(gt=0)
    pct_teacher_flops: float = Field(gt=0)
    exit_fractions: list[float]  # share of the split leaving at each stage

    @model_validator(mode="after")
    def _ranges(self):
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError("thresholds must lie in [0, 1]")
        if any(f < 0 for f in self.exit_fractions) or abs(sum(self.exit_fractions) - 1) > 1e-6:
            raise ValueError("exit_fractions must be >= 0 and sum to 1")
        return self


class OperatingPoints(BaseModel):
    """The version's validation-calibrated accuracy/compute curve, cheapest point first: from "first stage only"
    to "every stage", the Pareto-best points between them, and the calibrated point (`default`, the one
    `exit.thresholds` holds)."""
    model_config = ConfigDict(extra="allow")
    split: str
    n: int = Field(gt=0)
    default: str
    points: list[OperatingPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids(self):
        ids = [p.id for p in self.points]
        if len(set(ids)) != len(ids):
            raise ValueError(f"the points' ids must be unique, got {ids}")
        if self.default not in ids:
            raise ValueError(f"default {self.default!r} is not the id of a point (ids: {', '.join(ids)})")
        return self

    def point(self, point_id: str) -> OperatingPoint:
        return next(p for p in self.points if p.id == point_id)


class AuditSpec(BaseModel):
    """What the server's shadow audit compares early answers with, and how often they agreed on the validation split
    (docs/serving.md, "Monitoring"). The reference is a stage of this version (its fallback, usually the teacher:
    `stage`) or another version of the repository (`model`, NAME:VERSION). An answer agrees when its class equals
    the reference's; the server audits answers given before the last stage and compares their agreement with
    these figures."""
    model_config = ConfigDict(extra="allow")
    model: ModelRef | None = None
    stage: int | None = Field(None, ge=0)
    split: str
    n: int = Field(gt=0)
    # Per stage: the running logits after it against the reference, every image of the split (the reference of
    # answers cut short at that stage by a deadline).
    stage_agreement: list[float]
    # Per operating point (by id), per stage: the agreement among the images that leave at that stage under the
    # point (None: none leave there, or the stage is the reference itself).
    points: dict[str, list[float | None]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_reference(self):
        if (self.model is None) == (self.stage is None):
            raise ValueError("give exactly one of model (NAME:VERSION) or stage (a stage of this version)")
        values = [*self.stage_agreement, *(a for v in self.points.values() for a in v if a is not None)]
        if any(not 0.0 <= a <= 1.0 for a in values):
            raise ValueError("agreements must lie in [0, 1]")
        return self

    def expected(self, point: str | None, stage: int, deadline: bool = False) -> float | None:
        """The validation agreement an answer given at `stage` should have: its point's at that stage, or for an
        answer cut short by a deadline (or at a stage where the point has no figure) the stage's over every image;
        None for an answer of the client's own exit settings (no point)."""
        if point is None:
            return None
        figures = self.points.get(point)
        if not deadline and figures is not None and stage < len(figures) and figures[stage] is not None:
            return figures[stage]
        return self.stage_agreement[stage] if stage < len(self.stage_agreement) else None


class DriftSpec(BaseModel):
    """What the inputs looked like on the validation split, for drift signals that need no labels (docs/serving.md,
    "Monitoring"): the distribution of the energy score of stage 0's logits (reskd.exit_policy.energy; high means
    unlike the training data) as quantiles, its 99th percentile and the share of the split above it; and the mean
    exit confidence at each operating point."""
    model_config = ConfigDict(extra="allow")
    score: Literal["energy"] = "energy"
    stage: int = 0
    split: str
    n: int = Field(gt=0)
    levels: list[float] = Field(min_length=1)
    quantiles: list[float] = Field(min_length=1)
    p99: float
    above_p99: float = Field(ge=0, le=1)
    exit_confidence: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _quantiles(self):
        if len(self.levels) != len(self.quantiles):
            raise ValueError("levels and quantiles need one value each")
        if any(not 0 <= q <= 1 for q in self.levels) or self.levels != sorted(self.levels):
            raise ValueError("levels must rise within [0, 1]")
        return self


class StageParity(BaseModel):
    """ONNX against PyTorch on every validation image: the stage's own logits, and the running logits through it
    (absent in manifests written before it was measured)."""
    model_config = ConfigDict(extra="allow")
    max_abs_logit_diff: float
    argmax_agreement: float
    running_argmax_agreement: float | None = None
    n: int
    max_abs_output_diff: dict[str, float] | None = None  # each declared output besides logits (absent: none)


class ParitySpec(BaseModel):
    """One StageParity per stage, keyed by stage name, and the exit-stage agreement under the thresholds."""
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, StageParity]
    exit_stage_agreement: float | None = None

    @property
    def stages(self) -> dict[str, StageParity]:
        return dict(self.model_extra)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: int = Field(ge=1)
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    stages: list[StageSpec] = Field(min_length=1)
    teacher: TeacherSpec
    exit: ExitSpec
    metrics: MeasuredMetrics | None = None  # None until measured
    source: SourceSpec | None = None
    calibration: CalibrationSpec | None = None
    parity: ParitySpec | None = None
    # The arithmetic inside the stages' graphs (images and logits are float32 either way); absent means fp32.
    precision: Literal["fp32", "fp16"] = "fp32"
    # How a stage's logits make the running logits: "sum" (ResKD: the sum of the stage outputs so far) or
    # "replace" (a confidence cascade of independent models: the latest stage's logits). Absent means sum.
    combine: Literal["sum", "replace"] = "sum"
    # The accuracy/compute curve on the validation split (export and `reskd calibrate` write it); absent in older
    # manifests.
    operating_points: OperatingPoints | None = None
    # The shadow audit's reference and the drift signals' validation distribution (calibration writes them; absent
    # in older manifests: `reskd calibrate --references-only` adds them).
    audit: AuditSpec | None = None
    drift: DriftSpec | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _not_measured(cls, value):
        return value or None  # "metrics": {} is how an unmeasured version was once written

    @model_validator(mode="after")
    def _thresholds_per_stage(self):
        if len(self.exit.thresholds) != len(self.stages) - 1:
            raise ValueError(f"exit.thresholds needs {len(self.stages) - 1} values (one per stage but the last), "
                             f"has {len(self.exit.thresholds)}")
        return self

    @model_validator(mode="after")
    def _sources_exist(self):
        """Every stage input reads the images or a declared output of an earlier stage."""
        provided: set[str] = set()  # "stage.output" of the stages so far
        for i, stage in enumerate(self.stages):
            if stage.outputs and any(s.name == stage.name for s in self.stages[:i]):
                raise ValueError(f"stages.{i}.name: {stage.name!r} is used by an earlier stage (a stage with outputs "
                                 "needs a name of its own: its outputs are named after it)")
            for j, inp in enumerate(stage.inputs):
                if inp.source != IMAGES and inp.source not in provided:
                    raise ValueError(f"stages.{i}.inputs.{j}.source: {inp.source!r} is not an output of an earlier "
                                     f"stage (declared: {', '.join(sorted(provided)) or 'none'}; or 'images')")
            provided.update(f"{stage.name}.{o.name}" for o in stage.outputs)
        return self

    @model_validator(mode="after")
    def _points_fit_the_stages(self):
        """Every operating point describes this cascade, and the default one is what `exit` holds."""
        if self.operating_points is None:
            return self
        n = len(self.stages)
        for i, p in enumerate(self.operating_points.points):
            where = f"operating_points.points.{i} ({p.id})"
            if len(p.thresholds) != n - 1:
                raise ValueError(f"{where}.thresholds: needs {n - 1} values (one per stage but the last), has "
                                 f"{len(p.thresholds)}")
            if p.max_stage >= n:
                raise ValueError(f"{where}.max_stage: {p.max_stage} is past the last stage ({n - 1})")
            if len(p.exit_fractions) != n or any(p.exit_fractions[p.max_stage + 1:]):
                raise ValueError(f"{where}.exit_fractions: needs {n} values (one per stage), none after max_stage")
        default = self.operating_points.point(self.operating_points.default)
        if default.thresholds != self.exit.thresholds or default.max_stage != n - 1:
            raise ValueError(f"operating_points: the default point {default.id!r} (thresholds {default.thresholds}, "
                             f"max_stage {default.max_stage}) is not what exit.thresholds holds "
                             f"({self.exit.thresholds}, every stage); recalibrate with `reskd calibrate`")
        return self

    @model_validator(mode="after")
    def _references_fit(self):
        n = len(self.stages)
        if self.audit is not None:
            if self.audit.stage is not None and self.audit.stage >= n:
                raise ValueError(f"audit.stage: {self.audit.stage} is past the last stage ({n - 1})")
            if len(self.audit.stage_agreement) != n or any(len(v) != n for v in self.audit.points.values()):
                raise ValueError(f"audit: stage_agreement and every point need {n} values (one per stage)")
        if self.drift is not None and self.drift.stage >= n:
            raise ValueError(f"drift.stage: {self.drift.stage} is past the last stage ({n - 1})")
        return self

    def audit_target(self) -> tuple[int | None, str | None]:
        """(stage, NAME:VERSION) the version's answers are audited against, as its manifest names it: its audit
        section's stage or model, else teacher.model; (None, None) when it names none."""
        if self.audit is not None:
            return self.audit.stage, self.audit.model
        return None, self.teacher.model

    @property
    def stage_combine(self) -> list[str]:
        """How each stage's logits make the running logits: its own `combine`, else the cascade's."""
        return [s.combine or self.combine for s in self.stages]

    def source_shape(self, source: str) -> tuple[int, ...]:
        """Per-sample shape of a source: the images' [C, H, W], or an earlier stage's declared output shape."""
        if source == IMAGES:
            return (self.input.channels, self.input.height, self.input.width)
        stage, _, output = source.rpartition(".")
        return next(tuple(o.shape) for s in self.stages if s.name == stage for o in s.outputs if o.name == output)

    @property
    def stage_flops(self) -> list[int]:
        return [s.flops for s in self.stages]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(version_dir: Path, verify_files: bool = True, check_folder_name: bool = True) -> Manifest:
    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise ManifestError(f"{path}: {'; '.join(describe(err))}") from None
    if check_folder_name and str(manifest.version) != Path(version_dir).name:
        raise ManifestError(f"{path}: version: {manifest.version} does not match its folder {Path(version_dir).name!r}")
    if verify_files:
        for i, stage in enumerate(manifest.stages):
            f = Path(version_dir) / stage.file
            if not f.is_file():
                raise ManifestError(f"{path}: stages.{i}.file: {stage.file} is missing from {version_dir}")
            digest = sha256_file(f)
            if digest != stage.sha256:
                raise ManifestError(f"{path}: stages.{i}.sha256: {stage.file} has sha256 {digest}, the manifest "
                                    f"says {stage.sha256} (file changed or corrupt; re-export the model)")
    return manifest


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    """Validated again (a model changed with model_copy is not), then written atomically: the fields that were
    given, read or set, and every unknown field as it was read."""
    manifest = Manifest.model_validate(manifest.model_dump(exclude_unset=True))
    write_atomic(Path(version_dir) / MANIFEST, manifest.model_dump_json(indent=1, exclude_unset=True) + "\n")


class VersionExists(ManifestError):
    """A version folder is there already: versions are never overwritten."""


class ModelRepository:
    """REPO/NAME/VERSION/ folders, VERSION a positive integer without leading zeros (VERSION_FOLDER): the one rule
    for what a version folder is, for reading and writing alike. A version is served once its manifest.json is
    there; the highest version is used unless one is named."""

    VERSION_FOLDER = re.compile(r"[1-9][0-9]*")

    def __init__(self, root: str | Path, create: bool = False):
        """create: make the folder when it is missing (writing), instead of refusing it (serving)."""
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise ManifestError(f"model repository {self.root} does not exist")

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def holds(self, name: str) -> bool:
        """Whether `name` is a model folder of the repository, matched against its listing before any path is built
        from it: a name too long for the file system, or one naming another place ("..", a separator), is simply
        not one."""
        return name in {p.name for p in self.root.iterdir() if p.is_dir()}

    def folders(self, name: str) -> list[Path]:
        """Every version folder of the model, finished (with a manifest) or not."""
        if not self.holds(name):
            return []
        d = self.root / name
        return sorted((p for p in d.iterdir() if p.is_dir() and self.VERSION_FOLDER.fullmatch(p.name)),
                      key=lambda p: int(p.name))

    def versions(self, name: str) -> list[int]:
        return [int(p.name) for p in self.folders(name) if (p / MANIFEST).is_file()]

    def unfinished_versions(self) -> list[Path]:
        """Version folders (REPO/NAME/N) without a manifest.json: not served, worth a warning."""
        return sorted(p for d in self.root.iterdir() if d.is_dir() for p in self.folders(d.name)
                      if not (p / MANIFEST).is_file())

    def next_version(self, name: str) -> int:
        """One above every version folder of the model, finished or not."""
        return max((int(p.name) for p in self.folders(name)), default=0) + 1

    def check_new(self, name: str, version: int) -> Path:
        """The folder a new version would take; raises ManifestError when `version` is no version folder's name,
        VersionExists when the folder is there already."""
        final = self.root / name / str(version)
        if not self.VERSION_FOLDER.fullmatch(str(version)):
            raise ManifestError(f"version {version!r} is not a positive integer")
        if final.exists():
            raise VersionExists(f"{final} already exists: versions are never overwritten; pick another version")
        return final

    def write_version(self, name: str, version: int, build: Callable[[Path], Manifest]) -> tuple[Path, Manifest]:
        """build(tmp) fills a temporary folder beside the version's and returns its manifest; the folder is renamed
        to NAME/VERSION only if build succeeds, so a server never sees half a version. Raises as check_new."""
        final = self.check_new(name, version)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        # mkdir, not mkdtemp: the folder gets the umask's permissions (mkdtemp's 0700 would keep a server running
        # as another user, e.g. in a container, from reading the version). A dot folder is no version folder.
        tmp = self.root / name / f".{version}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            manifest = build(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, manifest

    def resolve(self, name: str, version: int | None = None) -> Path:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise ManifestError(f"no model {name!r} in {self.root} (models: {known})")
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise ManifestError(f"model {name!r} has no version {version} (versions: {versions})")
        return self.root / name / str(version)

    def load(self, name: str, version: int | None = None) -> tuple[Path, Manifest]:
        path = self.resolve(name, version)
        return path, load_manifest(path)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """'NAME' or 'NAME:VERSION'."""
    name, _, version = ref.partition(":")
    if not name or (version and not version.isdigit()):
        raise ManifestError(f"model reference {ref!r} should be NAME or NAME:VERSION")
    return name, int(version) if version else None
