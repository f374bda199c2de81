"""A recipe: one TOML file per setting holding every hyperparameter of a run, validated before any work starts.

Each stage section (`teacher`, `student`, every `[[res_students]]`, `baselines`) may override any field of the
shared `[train]` section; what it leaves out it inherits.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reskd.validation import describe

from .models import ModelSpec, available_models

RECIPE_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """The recipe cannot be used; the message names the field and what is wrong with it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder"]
    root: str | None = None
    download: bool = False
    val_size: int = Field(5000, gt=0)
    split_seed: int = 0
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: int = Field(64, gt=0)  # imagefolder only
    channels: Literal[1, 3] = 3  # imagefolder only
    workers: int = Field(4, ge=0)  # imagefolder only
    # Smoke runs only (the sweep's --tiny): keep the first N training / test images after the split.
    max_train: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _stats(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither (then they are measured on train)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("data.std values must be > 0")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    crop_padding: int = Field(2, ge=0)
    flip: bool = True
    random_erasing: float = Field(0.0, ge=0, le=1)  # probability of erasing a random rectangle (Zhong et al. 2017)
    eval_batch_size: int = Field(512, ge=1)
    grad_clip: float | None = Field(None, gt=0)  # max global gradient norm; None = no clipping
    # The arithmetic of training steps: "auto" is bf16 autocast on CUDA and fp32 on the CPU; "bf16" or "fp32" ask
    # for one everywhere (bf16 on a CPU with avx512_bf16 / AMX roughly halves a step). Evaluation stays as "auto".
    autocast: Literal["auto", "bf16", "fp32"] = "auto"
    # Models and batches in channels_last memory format; absent: on CUDA only. A run-wide setting ([train] only).
    channels_last: bool | None = None
    # Distributed runs (torchrun): batch-norm statistics over the global batch, every rank's share together, as one
    # process computes them; off, each rank normalises by its own share (DDP's default; cheaper, the results
    # differ). Nothing changes in one process. A run-wide setting ([train] only).
    sync_batchnorm: bool = False


class _StageOverrides(_Strict):
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal["onecycle", "cosine"] | None = None
    warmup_epochs: float | None = Field(None, ge=0)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    crop_padding: int | None = Field(None, ge=0)
    flip: bool | None = None
    random_erasing: float | None = Field(None, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)

    def resolve(self, base: TrainConfig) -> TrainConfig:
        given = {k: v for k, v in self.model_dump().items() if k in TrainConfig.model_fields and v is not None}
        return base.model_copy(update=given)


class GridEntry(_Strict):
    """A model of the registry: architecture name and width multiplier."""

    arch: str
    width: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _known_arch(self):
        if self.arch not in available_models():
            raise ValueError(f"unknown arch {self.arch!r}; available: {', '.join(available_models())}")
        return self

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.arch, self.width)


class _ModelSection(_StageOverrides, GridEntry):
    """A stage: its model plus any training settings it overrides."""


class TeacherConfig(_ModelSection):
    checkpoint: str | None = None  # a checkpoint of this arch to load instead of training


class StudentConfig(_ModelSection):
    kd_alpha: float = Field(0.1, ge=0, le=1)  # weight of CE on labels; 1 - kd_alpha goes to the KD term
    kd_temperature: float = Field(4.0, gt=0)


class ResStudentConfig(_ModelSection):
    mse_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    kd_weight: float = Field(0.0, ge=0)
    kd_temperature: float = Field(4.0, gt=0)
    residual_norm: Literal["initial", "none"] = "initial"
    # What the res-student reads: the image, or the student's last feature map (before pooling), so it sees what
    # the student saw and reuses its compute; its FLOPs count only its own layers. A `head*` arch suits features.
    input: Literal["image", "features"] = "image"
    # "reach": each sample's loss weighted by 1 - max softmax of the cascade so far (normalised to mean 1 per
    # batch): the stage learns mostly from the samples that will still be there when it runs.
    sample_weighting: Literal["none", "reach"] = "none"
    seed: int = Field(0, ge=0)  # re-seeds this stage alone (init and data order): repeats of one variant

    @model_validator(mode="after")
    def _some_loss(self):
        if self.mse_weight + self.ce_weight + self.kd_weight == 0:
            raise ValueError("a res-student needs at least one of mse_weight, ce_weight, kd_weight > 0")
        return self


class BaselinesConfig(_StageOverrides):
    kd_grid: list[GridEntry] = []
    # Models (from the grid, or the student) chained as a confidence cascade without residual sum, cheapest first.
    independent_cascade: list[GridEntry] = []
    kd_alpha: float = Field(0.1, ge=0, le=1)
    kd_temperature: float = Field(4.0, gt=0)


class EvalConfig(_Strict):
    exit_measure: Literal["max_prob", "margin", "entropy"] = "max_prob"
    target_drop_pt: float = Field(0.1, ge=0)  # adaptive accuracy >= full cascade - this, on validation
    bound: Literal["upper", "point"] = "upper"
    bound_z: float = Field(1.0, ge=0)
    bootstrap_samples: int = Field(1000, ge=10)


class Recipe(_Strict):
    name: str
    seed: int = 0
    data: DataConfig
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig
    student: StudentConfig
    res_students: list[ResStudentConfig] = []
    baselines: BaselinesConfig = BaselinesConfig()
    evaluation: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cascade_subset(self):
        known = {g.spec for g in self.baselines.kd_grid} | {self.student.spec}
        for entry in self.baselines.independent_cascade:
            if entry.spec not in known:
                raise ValueError(f"baselines.independent_cascade names {entry.spec.tag}, which is neither the "
                                 "student nor in baselines.kd_grid; add it to kd_grid")
        return self


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPE_DIR / f"{name_or_path}.toml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
    raise RecipeError(f"recipe {name_or_path!r} is neither a file nor a bundled recipe ({names})")


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source} is invalid:\n" + "\n".join("  " + line for line in describe(err))) from None


def load_recipe(name_or_path: str, overrides: dict | None = None, tiny: bool = False) -> Recipe:
    """A recipe file, its [tiny] overrides applied when tiny (a smoke run: `reskd train --tiny`), then
    `overrides` (--set)."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path} is not valid TOML: {err}") from None
    smoke = data.pop("tiny", None)
    if tiny and smoke is None:
        raise RecipeError(f"{path} has no [tiny] section of overrides for --tiny")
    for dotted, value in {**(smoke if tiny else {}), **(overrides or {})}.items():
        set_dotted(data, dotted, value)
    return parse_recipe(data, str(path))


def set_dotted(data: dict, dotted: str, value) -> None:
    """Set `a.b.0.c` in nested dicts/lists (used by --set and the sweep); `*` in place of an index sets it in
    every entry of that list (none when it is empty), e.g. `res_students.*.epochs`."""
    keys = dotted.split(".")

    def walk(node, depth: int) -> None:
        key, last = keys[depth], depth == len(keys) - 1
        if isinstance(node, list):
            if key == "*":
                indices = range(len(node))
            elif key.isdigit() and int(key) < len(node):
                indices = [int(key)]
            else:
                where = ".".join(keys[:depth]) or "(top level)"
                raise RecipeError(f"override {dotted}: {where} is a list of {len(node)} entries; "
                                  f"{key!r} is not an index into it (nor *)")
            for i in indices:
                if last:
                    node[i] = value
                else:
                    walk(node[i], depth + 1)
        elif last:
            node[key] = value
        else:
            walk(node.setdefault(key, {}), depth + 1)

    walk(data, 0)
