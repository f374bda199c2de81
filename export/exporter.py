"""`reskd export`: a run directory -> two new versions in a model repository: the cascade (NAME: student and
res-students, one ONNX file each) and its teacher (NAME-teacher, a single stage), so one server can serve both.

Each stage is exported with a dynamic batch axis, then checked against PyTorch on every validation image (max
|logit difference| reported, argmax agreement must be 100%). Thresholds are calibrated through the runtime, and the
cascade's exit stages under them must be the same whether the stages run in PyTorch or in onnxruntime. A version is
written to a temporary folder and renamed into place only when everything passed; an existing version is never
overwritten.

Precision (--precision): fp32, or fp16 (weights and activations in half precision inside the graph; images in and
logits out stay float32, so nothing else changes). Parity is measured against the fp32 PyTorch networks as for
fp32, with a tolerance only reduced precision needs (`MIN_AGREEMENT`), and thresholds are calibrated on the fp16
graph: the precision that is served. bf16 is not offered: ONNX's Conv takes bfloat16 only from opset 22, which
onnxruntime's CPU and CUDA kernels do not run for convolutions.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from reskd.cascade import running_logits
from reskd.device import Device
from reskd.exit_policy import confidence, exit_stages
from reskd.manifest import (ExitSpec, InputSpec, Manifest, ModelRepository, ParitySpec, SourceSpec, StageParity,
                            StageSpec, TeacherSpec, sha256_file, write_manifest)
from reskd.preprocess import normalise
from reskd.runtime import CascadeRuntime
from reskd.training.data import load_dataset
from reskd.training.flops import count_flops
from reskd.training.recipe import DataConfig, EvalConfig, parse_recipe
from reskd.training.rundir import RunDir, RunDirError

from .calibrate import EvalSet, calibrate_version, measure_test


class ExportError(RuntimeError):
    pass


Precision = Literal["fp32", "fp16"]
# The least argmax agreement with the fp32 PyTorch network (per stage) and exit-stage agreement (cascade) a
# version may have, by precision: fp32 must agree everywhere; fp16 rounds logits by ~1e-3, which may flip a
# near-tie, at most 1 validation image in 500 here.
MIN_AGREEMENT: dict[str, float] = {"fp32": 1.0, "fp16": 0.998}


class InPrecision(torch.nn.Module):
    """A network computing in `dtype`, with float32 images in and float32 logits out (casts inside the graph)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, int, int],
                precision: Precision = "fp32") -> None:
    if precision == "fp16":
        model = InPrecision(model, torch.float16).eval()
    torch.onnx.export(model, (torch.zeros(2, *input_shape),), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                      external_data=False, verbose=False, optimize=True)


def split_pixels(split) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, C, H, W] and labels of a training-data split, whichever kind it is."""
    if hasattr(split, "images"):
        return split.images.cpu().numpy(), split.labels.cpu().numpy()
    items = [split.dataset[int(i)] for i in split.ids]
    return np.stack([x.numpy() for x, _ in items]), np.asarray([y for _, y in items])


def eval_sets(data_cfg: dict, input_spec, expected_val_ids: list[int] | None = None) -> tuple[EvalSet, EvalSet]:
    """Validation and test images of a run, normalised exactly as the server will (reskd.preprocess)."""
    data = load_dataset(DataConfig.model_validate(data_cfg))
    if expected_val_ids is not None and data.val.ids.tolist() != expected_val_ids:
        raise ExportError("the validation split loaded now differs from the one the run recorded (run.json); "
                          "the dataset or split settings changed")
    out = []
    for split in (data.val, data.test):
        pixels, labels = split_pixels(split)
        out.append(EvalSet(normalise(pixels, input_spec), labels.astype(np.int64)))
    return out[0], out[1]


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])


def next_version(repo: Path, name: str) -> int:
    d = repo / name
    existing = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(existing, default=0) + 1


def write_version(repo: Path, name: str, version: int, build: Callable[[Path], Manifest]) -> tuple[Path, Manifest]:
    """build(tmp_dir) fills a temporary folder and returns its manifest; the folder is renamed to REPO/NAME/VERSION
    only if build succeeds."""
    final = repo / name / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists: versions are never overwritten; pick another --version")
    (repo / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=repo / name))
    try:
        manifest = build(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, manifest


def input_spec_of(run_data: dict, recipe) -> InputSpec:
    return InputSpec(channels=run_data["channels"], height=run_data["height"], width=run_data["width"],
                     color="L" if run_data["channels"] == 1 else "RGB",
                     resize="fit-center" if recipe.data.dataset == "imagefolder" else "bilinear",
                     mean=run_data["mean"], std=run_data["std"])


@dataclass
class Exporter:
    """What every model version exported from one run shares: its networks (PyTorch, on the CPU), their FLOPs,
    the validation and test images, and the manifest fields that come from the run."""

    networks: dict[str, torch.nn.Module]
    flops: dict[str, int]
    labels: list[str]
    input: InputSpec
    source: SourceSpec
    evaluation: EvalConfig
    val: EvalSet
    test: EvalSet
    log: Callable[[str], None]
    precision: Precision = "fp32"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.input.channels, self.input.height, self.input.width

    def manifest(self, name: str, version: int, stages: list[StageSpec], teacher_accuracy: float | None) -> Manifest:
        """A version's manifest before calibration: every threshold 1.0 (no early exit), nothing measured."""
        # precision is written only when reduced: fp32 manifests stay as they were
        reduced = {"precision": self.precision} if self.precision != "fp32" else {}
        return Manifest(name=name, version=version, labels=self.labels, input=self.input, stages=stages,
                        teacher=TeacherSpec(flops=self.flops["teacher"], accuracy=teacher_accuracy),
                        exit=ExitSpec(measure=self.evaluation.exit_measure, thresholds=[1.0] * (len(stages) - 1)),
                        source=self.source, **reduced)

    def write_stages(self, folder: Path, names: list[str]) -> list[StageSpec]:
        stages = []
        for i, n in enumerate(names):
            file = f"stage{i}-{n}.onnx"
            export_onnx(self.networks[n], folder / file, self.shape, self.precision)
            stages.append(StageSpec(name=n, file=file, sha256=sha256_file(folder / file), flops=self.flops[n]))
        return stages

    def check_parity(self, rt: CascadeRuntime, names: list[str]) -> tuple[dict[str, StageParity], list[np.ndarray]]:
        """ONNX against PyTorch on every validation image, stage by stage: each stage's own logits, and the running
        logits through it (what exits and answers are made of). fp32 must agree on every argmax; reduced precision
        on the running logits' argmax within MIN_AGREEMENT (a res-student's own output is a small correction whose
        argmax alone means nothing, so rounding flips it freely). -> (parity per stage, PyTorch's validation
        logits per stage)."""
        report, torch_outs = {}, []
        ref_total = got_total = 0.0
        floor = MIN_AGREEMENT[self.precision]
        for i, n in enumerate(names):
            ref = torch_logits(self.networks[n], self.val.images)
            got = np.concatenate([rt.stage_logits(i, self.val.images[j:j + 1000])
                                  for j in range(0, len(self.val.images), 1000)])
            ref_total, got_total = ref_total + ref.astype(np.float64), got_total + got.astype(np.float64)
            agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
            running = float((ref_total.argmax(-1) == got_total.argmax(-1)).mean())
            report[n] = StageParity(max_abs_logit_diff=float(np.abs(ref - got).max()), argmax_agreement=agree,
                                    running_argmax_agreement=running, n=len(ref))
            self.log(f"parity {n} ({self.precision}): max |dlogit| {report[n].max_abs_logit_diff:.2e}, argmax "
                     f"agreement {agree:.4%}, running logits {running:.4%}")
            worst = min(agree, running) if self.precision == "fp32" else running
            if worst < floor:
                raise ExportError(f"parity failed for stage {n}: ONNX ({self.precision}) and PyTorch disagree on the "
                                  f"class of {int(round((1 - worst) * len(ref)))} validation images (at most "
                                  f"{1 - floor:.1%} may)")
            torch_outs.append(ref)
        return report, torch_outs

    def single(self, folder: Path, network: str, name: str, version: int,
               teacher_accuracy: float | None) -> Manifest:
        """One network as a one-stage model. For the teacher itself, teacher_accuracy is None: it is measured."""
        manifest = self.manifest(name, version, self.write_stages(folder, [network]), teacher_accuracy)
        write_manifest(folder, manifest)
        rt = _runtime(folder)
        parity, _ = self.check_parity(rt, [network])
        metrics = measure_test(rt, self.test, self.flops["teacher"], teacher_accuracy)
        if teacher_accuracy is None:
            metrics.teacher_accuracy = metrics.adaptive_accuracy
        manifest = manifest.model_copy(update={
            "teacher": TeacherSpec(flops=self.flops["teacher"], accuracy=metrics.teacher_accuracy),
            "metrics": metrics, "parity": ParitySpec(**parity)})
        write_manifest(folder, manifest)
        return manifest

    def cascade(self, folder: Path, names: list[str], name: str, version: int, teacher_accuracy: float, *,
                target_drop_pt: float | None, flops_budget_pct: float | None) -> Manifest:
        """The student and res-students as one cascade, calibrated through the runtime."""
        write_manifest(folder, self.manifest(name, version, self.write_stages(folder, names), teacher_accuracy))
        rt = _runtime(folder)
        parity, torch_outs = self.check_parity(rt, names)
        manifest = calibrate_version(folder, self.val, self.test, target_drop_pt=target_drop_pt,
                                     flops_budget_pct=flops_budget_pct, bound=self.evaluation.bound,
                                     z=self.evaluation.bound_z, runtime=rt)
        # The exits PyTorch's logits would give under the calibrated thresholds must be the runtime's.
        running = running_logits(torch_outs)
        torch_exits = exit_stages(confidence(running, manifest.exit.measure), manifest.exit.thresholds)
        rt_exits = rt.run(self.val.images).exit_stage
        differ = int((torch_exits != rt_exits).sum())
        agreement = 1.0 - differ / len(rt_exits)
        self.log(f"exit-stage agreement with PyTorch (fp32) under the calibrated thresholds: {agreement:.4%}")
        if agreement < MIN_AGREEMENT[self.precision]:
            raise ExportError(f"parity failed: {differ} validation images exit at another stage in onnxruntime "
                              f"({self.precision}) than in PyTorch under the calibrated thresholds")
        manifest = manifest.model_copy(update={"parity": ParitySpec(**parity, exit_stage_agreement=agreement)})
        write_manifest(folder, manifest)
        return manifest


def open_run(run: RunDir, info: dict, recipe, networks: list[str], log: Callable[[str], None],
             precision: Precision = "fp32") -> Exporter:
    """The Exporter of a run (its run.json `info`, its `recipe`) over `networks` and the teacher."""
    checkpoints = {n: run.load_checkpoint(n) for n in dict.fromkeys(["teacher", *networks])}
    for n, ckpt in checkpoints.items():
        if ckpt.extra.get("reads"):
            raise ExportError(f"stage {n} reads {ckpt.extra['reads']}, not the image: a model version cannot declare "
                              "stage inputs yet, so this cascade cannot be exported (train res-students with "
                              "input = \"image\" to serve them today)")
    models = {n: ckpt.build() for n, ckpt in checkpoints.items()}
    spec = input_spec_of(info["data"], recipe)
    shape = (spec.channels, spec.height, spec.width)
    val, test = eval_sets(info["recipe"]["data"], spec, info["data"]["val_ids"])
    log(f"validation {len(val.labels)} / test {len(test.labels)} images")
    source = SourceSpec(run=str(run.path), recipe=recipe.name, data=info["recipe"]["data"],
                        exported=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__)
    return Exporter(models, {n: count_flops(m, shape) for n, m in models.items()}, info["data"]["labels"], spec,
                    source, recipe.evaluation, val, test, log, precision)


def export_run(run_dir: str | Path, repo: str | Path, name: str, version: int | None = None, *,
               target_drop_pt: float | None = None, flops_budget_pct: float | None = None,
               model: str | None = None, precision: Precision = "fp32", log=print) -> dict:
    """model=None: the cascade as NAME and its teacher as NAME-teacher. model="kd-resnet8" (any checkpoint of the
    run): that one network alone as a one-stage NAME, measured against the run's teacher (for baselines).
    precision: of every version written (the teacher's too, so comparisons stay fair)."""
    if precision not in MIN_AGREEMENT:
        raise ExportError(f"precision must be one of {', '.join(MIN_AGREEMENT)}, got {precision!r}")
    repo = Path(repo)
    run = RunDir(run_dir)
    try:
        info = run.read_run_info()
    except RunDirError as err:
        raise ExportError(str(err)) from None
    recipe = parse_recipe(info["recipe"])
    if model is not None and not run.has_checkpoint(model):
        have = ", ".join(run.checkpoint_names()) or "none"
        raise ExportError(f"the run has no model {model!r} (checkpoints: {have})")
    repo.mkdir(parents=True, exist_ok=True)
    cascade_version = version or next_version(repo, name)
    teacher_name = f"{name}-teacher"
    teacher_version = version or next_version(repo, teacher_name)
    targets = ((name, cascade_version),) if model else ((name, cascade_version), (teacher_name, teacher_version))
    for n, v in targets:
        if (repo / n / str(v)).exists():
            raise ExportError(f"{repo / n / str(v)} already exists: versions are never overwritten")

    stage_names = [model] if model else ["student"] + [f"res{k + 1}" for k in range(len(recipe.res_students))]
    try:
        exporter = open_run(run, info, recipe, stage_names, log, precision)
    except RunDirError as err:
        raise ExportError(str(err)) from None

    if model is not None:
        out, manifest = export_network(exporter, model, repo, name, cascade_version)
        return {"model": str(out), "model_manifest": manifest}
    if target_drop_pt is None and flops_budget_pct is None:
        target_drop_pt = recipe.evaluation.target_drop_pt
    (cascade_dir, cascade), (teacher_dir, teacher) = export_cascade(
        exporter, stage_names, repo, name, cascade_version, teacher_version, target_drop_pt=target_drop_pt,
        flops_budget_pct=flops_budget_pct)
    return {"cascade": str(cascade_dir), "teacher": str(teacher_dir), "cascade_manifest": cascade,
            "teacher_manifest": teacher}


def export_network(exporter: Exporter, network: str, repo: Path, name: str, version: int) -> tuple[Path, Manifest]:
    """One network of the run as a one-stage model, measured against the run's teacher."""
    teacher_logits = torch_logits(exporter.networks["teacher"], exporter.test.images)
    teacher_accuracy = float((teacher_logits.argmax(-1) == exporter.test.labels).mean())
    out = write_version(repo, name, version, lambda tmp: exporter.single(tmp, network, name, version, teacher_accuracy))
    ModelRepository(repo).load(name, version)  # final check: as a server would load it
    return out


def export_cascade(exporter: Exporter, stage_names: list[str], repo: Path, name: str, version: int,
                   teacher_version: int, *, target_drop_pt: float | None,
                   flops_budget_pct: float | None) -> tuple[tuple[Path, Manifest], tuple[Path, Manifest]]:
    """The teacher as NAME-teacher, then the cascade as NAME: both or neither."""
    teacher_name = f"{name}-teacher"
    teacher_dir, teacher = write_version(
        repo, teacher_name, teacher_version,
        lambda tmp: exporter.single(tmp, "teacher", teacher_name, teacher_version, None))
    try:
        cascade = write_version(
            repo, name, version,
            lambda tmp: exporter.cascade(tmp, stage_names, name, version, teacher.metrics.adaptive_accuracy,
                                         target_drop_pt=target_drop_pt, flops_budget_pct=flops_budget_pct))
    except BaseException:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        raise
    ModelRepository(repo).load(name, version)  # final check: as a server would load them
    ModelRepository(repo).load(teacher_name, teacher_version)
    return cascade, (teacher_dir, teacher)


def _runtime(folder: Path) -> CascadeRuntime:
    # The folder is renamed to its version only at the end, so its name is not checked here.
    return CascadeRuntime(folder, device=Device.cpu(), check_folder_name=False)
