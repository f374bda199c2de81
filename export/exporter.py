"""`reskd export`: a run directory -> two new versions in a model repository: the cascade (NAME: student and
res-students, one ONNX file each) and its teacher (NAME-teacher, a single stage), so one server can serve both.

Each stage is exported with a dynamic batch axis, then checked against PyTorch on every validation image (max
|logit difference| reported, argmax agreement must be 100%). Thresholds are calibrated through the runtime, and the
cascade's exit stages under them must be the same whether the stages run in PyTorch or in onnxruntime. A version is
written to a temporary folder and renamed into place only when everything passed; an existing version is never
overwritten.

Stage inputs: a res-student trained on the student's last feature map (`input = "features"`) is exported as a
graph reading `features`; the student's graph then also outputs `features`, and the manifest declares both (stage
`inputs` / `outputs`), so the runtime carries the map to the samples that reach the head. Parity is checked for
every output of every graph. Cascade kinds (--combine): `sum` (ResKD, the default: the student and its
res-students) or `replace` (a confidence cascade of independent models, e.g. the run's KD baselines; --stages
names them in order, by default the recipe's `baselines.independent_cascade`). --fallback appends another network
of the run (typically the teacher) as a last stage whose logits replace the running logits (its stage's `combine`
is `replace`): the samples no earlier stage is confident about get the fallback's answer. Every cascade names its
teacher's version (`teacher.model`).

Precision (--precision): fp32, or fp16 (weights and activations in half precision inside the graph; images in and
logits out stay float32, so nothing else changes). Parity is measured against the fp32 PyTorch networks as for
fp32, with a tolerance only reduced precision needs (`MIN_AGREEMENT`), and thresholds are calibrated on the fp16
graph: the precision that is served. bf16 is not offered: ONNX's Conv takes bfloat16 only from opset 22, which
onnxruntime's CPU and CUDA kernels do not run for convolutions.
"""

from __future__ import annotations

import copy
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from reskd.cascade import COMBINE_KINDS, running_logits
from reskd.device import Device
from reskd.exit_policy import confidence, exit_stages
from reskd.manifest import (IMAGES, ExitSpec, InputSpec, Manifest, ModelRepository, ParitySpec, SourceSpec,
                            StageInput, StageOutput, StageParity, StageSpec, TeacherSpec, sha256_file,
                            write_manifest)
from reskd.preprocess import normalise
from reskd.runtime import CascadeRuntime
from reskd.training.data import load_dataset
from reskd.training.flops import count_flops
from reskd.training.pipeline import feature_shape
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
# The largest difference a carried output (e.g. a feature map) may show against PyTorch, relative to the largest
# magnitude PyTorch gives it, by precision. What matters downstream is checked anyway: the logits of the stages
# that read it.
MAX_RELATIVE_DIFF: dict[str, float] = {"fp32": 1e-3, "fp16": 5e-2}


class InPrecision(torch.nn.Module):
    """A network computing in `dtype`, with float32 tensors in and out (casts inside the graph)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor):
        out = self.model(x.to(self.dtype))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


class WithFeatures(torch.nn.Module):
    """An image model giving its logits and its last feature map (computed once), for stages that read it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(images)
        return self.model.logits_from_features(features), features


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...], precision: Precision = "fp32",
                input_name: str = IMAGES, output_names: tuple[str, ...] = ("logits",)) -> None:
    """One graph: `input_name` float32 [N, *input_shape] -> output_names, float32, [N, ...] (dynamic N)."""
    if precision == "fp16":
        model = InPrecision(model, torch.float16).eval()
    torch.onnx.export(model, (torch.zeros(2, *input_shape),), str(path), input_names=[input_name],
                      output_names=list(output_names), dynamic_shapes=({0: torch.export.Dim("batch")},),
                      dynamo=True, external_data=False, verbose=False, optimize=True)


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
    # mkdir, not mkdtemp: the folder gets the umask's permissions (mkdtemp's 0700 would keep a server running as
    # another user, e.g. in a container, from reading the version)
    tmp = repo / name / f".{version}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
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
    flops: dict[str, int]  # each network's own work (a head's excludes the network it reads)
    reads: dict[str, str]  # network -> "NETWORK.features" it reads instead of the image (absent: the image)
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

    def manifest(self, name: str, version: int, stages: list[StageSpec], teacher_accuracy: float | None,
                 combine: str | None = None, teacher_model: str | None = None) -> Manifest:
        """A version's manifest before calibration: every threshold 1.0 (no early exit), nothing measured."""
        # precision is written only when reduced, combine only for cascades: other manifests stay as they were
        optional = {"precision": self.precision} if self.precision != "fp32" else {}
        if combine is not None:
            optional["combine"] = combine
        teacher = {"model": teacher_model} if teacher_model else {}
        return Manifest(name=name, version=version, labels=self.labels, input=self.input, stages=stages,
                        teacher=TeacherSpec(flops=self.flops["teacher"], accuracy=teacher_accuracy, **teacher),
                        exit=ExitSpec(measure=self.evaluation.exit_measure, thresholds=[1.0] * (len(stages) - 1)),
                        source=self.source, **optional)

    def check_stages(self, names: list[str]) -> None:
        """Every stage that reads another network's features comes after it in the cascade."""
        for i, n in enumerate(names):
            source = self.reads.get(n)
            if source and source.rpartition(".")[0] not in names[:i]:
                raise ExportError(f"stage {n} reads {source}: {source.rpartition('.')[0]} must be an earlier stage "
                                  f"of the cascade (stages: {', '.join(names)})")

    def feature_shape(self, network: str) -> list[int]:
        return list(feature_shape(self.networks[network], self.shape))

    def write_stages(self, folder: Path, names: list[str]) -> list[StageSpec]:
        """One graph per stage; a stage whose features a later stage reads also outputs `features`, and a stage
        that reads them takes `features` instead of the images."""
        self.check_stages(names)
        read = {self.reads[n] for n in names if n in self.reads}
        stages = []
        for i, n in enumerate(names):
            file = f"stage{i}-{n}.onnx"
            source = self.reads.get(n)
            inputs = [StageInput(name="features", source=source)] if source else None
            outputs = [StageOutput(name="features", shape=self.feature_shape(n))] if f"{n}.features" in read else []
            model = WithFeatures(self.networks[n]).eval() if outputs else self.networks[n]
            shape = tuple(self.feature_shape(source.rpartition(".")[0])) if source else self.shape
            export_onnx(model, folder / file, shape, self.precision, input_name="features" if source else IMAGES,
                        output_names=("logits", *(o.name for o in outputs)))
            declared = {"inputs": inputs} if inputs else {}
            if outputs:
                declared["outputs"] = outputs
            stages.append(StageSpec(name=n, file=file, sha256=sha256_file(folder / file), flops=self.flops[n],
                                    **declared))
        return stages

    @torch.no_grad()
    def torch_outputs(self, stages: list[StageSpec]) -> list[dict[str, np.ndarray]]:
        """PyTorch's logits and declared outputs of every stage on every validation image (the reference)."""
        out: list[dict[str, list]] = [{} for _ in stages]
        for j in range(0, len(self.val.images), 1000):
            values = {IMAGES: torch.from_numpy(self.val.images[j:j + 1000])}
            for s, stage in enumerate(stages):
                model, x = self.networks[stage.name], values[stage.inputs[0].source]
                if stage.outputs:
                    features = model.features(x)
                    values[f"{stage.name}.features"] = features
                    got = {"logits": model.logits_from_features(features), "features": features}
                else:
                    got = {"logits": model(x)}
                for name, value in got.items():
                    out[s].setdefault(name, []).append(value.numpy())
        return [{name: np.concatenate(v) for name, v in o.items()} for o in out]

    def check_parity(self, rt: CascadeRuntime) -> tuple[dict[str, StageParity], list[np.ndarray]]:
        """ONNX against PyTorch on every validation image, stage by stage: each stage's own logits, the running
        logits through it (what exits and answers are made of), and every other output it declares (within
        MAX_RELATIVE_DIFF). fp32 must agree on every argmax; reduced precision on the running logits' argmax within
        MIN_AGREEMENT (a res-student's own output is a small correction whose argmax alone means nothing, so
        rounding flips it freely). -> (parity per stage, PyTorch's validation logits per stage)."""
        report, torch_outs = {}, []
        stages = rt.manifest.stages
        refs, gots = self.torch_outputs(stages), rt.graph_outputs(self.val.images)
        kinds = rt.manifest.stage_combine
        ref_running = running_logits([r["logits"] for r in refs], kinds)
        got_running = running_logits([g["logits"] for g in gots], kinds)
        floor = MIN_AGREEMENT[self.precision]
        for i, stage in enumerate(stages):
            n = stage.name
            ref, got = refs[i]["logits"], gots[i]["logits"]
            agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
            running = float((ref_running[i].argmax(-1) == got_running[i].argmax(-1)).mean())
            others = {}
            for o in stage.outputs:
                diff = float(np.abs(refs[i][o.name] - gots[i][o.name]).max())
                scale = float(np.abs(refs[i][o.name]).max()) or 1.0
                others[o.name] = diff
                self.log(f"parity {n}.{o.name} ({self.precision}): max |diff| {diff:.2e} (largest value {scale:.2f})")
                if diff > MAX_RELATIVE_DIFF[self.precision] * scale:
                    raise ExportError(f"parity failed for output {n}.{o.name}: ONNX ({self.precision}) differs from "
                                      f"PyTorch by up to {diff:.3g} on values up to {scale:.3g} (at most "
                                      f"{MAX_RELATIVE_DIFF[self.precision]:.0e} of it may)")
            extra = {"max_abs_output_diff": others} if others else {}
            report[n] = StageParity(max_abs_logit_diff=float(np.abs(ref - got).max()), argmax_agreement=agree,
                                    running_argmax_agreement=running, n=len(ref), **extra)
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
        if network in self.reads:
            raise ExportError(f"{network} reads {self.reads[network]}, not the image: it is not a model on its own")
        manifest = self.manifest(name, version, self.write_stages(folder, [network]), teacher_accuracy)
        write_manifest(folder, manifest)
        rt = _runtime(folder)
        parity, _ = self.check_parity(rt)
        metrics = measure_test(rt, self.test, self.flops["teacher"], teacher_accuracy)
        if teacher_accuracy is None:
            metrics.teacher_accuracy = metrics.adaptive_accuracy
        manifest = manifest.model_copy(update={
            "teacher": TeacherSpec(flops=self.flops["teacher"], accuracy=metrics.teacher_accuracy),
            "metrics": metrics, "parity": ParitySpec(**parity)})
        write_manifest(folder, manifest)
        return manifest

    def cascade(self, folder: Path, names: list[str], name: str, version: int, teacher_accuracy: float, *,
                target_drop_pt: float | None, flops_budget_pct: float | None, combine: str = "sum",
                fallback: str | None = None, teacher_model: str | None = None) -> Manifest:
        """The stages (the student and res-students, or independent models) as one cascade, and the fallback
        network after them as a replacing last stage, calibrated through the runtime."""
        stages = self.write_stages(folder, names + ([fallback] if fallback else []))
        if fallback:
            stages[-1] = stages[-1].model_copy(update={"combine": "replace"})
        write_manifest(folder, self.manifest(name, version, stages, teacher_accuracy, combine, teacher_model))
        rt = _runtime(folder)
        parity, torch_outs = self.check_parity(rt)
        manifest = calibrate_version(folder, self.val, self.test, target_drop_pt=target_drop_pt,
                                     flops_budget_pct=flops_budget_pct, bound=self.evaluation.bound,
                                     z=self.evaluation.bound_z, runtime=rt)
        # The exits PyTorch's logits would give under the calibrated thresholds must be the runtime's.
        running = running_logits(torch_outs, rt.manifest.stage_combine)
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
    reads = {n: ckpt.extra["reads"] for n, ckpt in checkpoints.items() if ckpt.extra.get("reads")}
    for n, source in reads.items():
        network, _, output = source.rpartition(".")
        if output != "features" or network not in checkpoints:
            raise ExportError(f"stage {n} reads {source}: only the features of a network of the export can be read "
                              f"(networks: {', '.join(checkpoints)})")
    models = {n: ckpt.build() for n, ckpt in checkpoints.items()}
    spec = input_spec_of(info["data"], recipe)
    shape = (spec.channels, spec.height, spec.width)
    inputs = {n: feature_shape(models[source.rpartition(".")[0]], shape) for n, source in reads.items()}
    val, test = eval_sets(info["recipe"]["data"], spec, info["data"]["val_ids"])
    log(f"validation {len(val.labels)} / test {len(test.labels)} images")
    source = SourceSpec(run=str(run.path), recipe=recipe.name, data=info["recipe"]["data"],
                        exported=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__)
    return Exporter(models, {n: count_flops(m, inputs.get(n, shape)) for n, m in models.items()}, reads,
                    info["data"]["labels"], spec, source, recipe.evaluation, val, test, log, precision)


def independent_stages(recipe) -> list[str]:
    """The networks of the recipe's independent-models cascade, in order, by their checkpoint names."""
    specs = [e.spec for e in recipe.baselines.independent_cascade]
    if not specs:
        raise ExportError("the recipe names no baselines.independent_cascade: give the stages with --stages")
    return ["student" if spec == recipe.student.spec else f"kd-{spec.tag}" for spec in specs]


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
    if precision not in MIN_AGREEMENT:
        raise ExportError(f"precision must be one of {', '.join(MIN_AGREEMENT)}, got {precision!r}")
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
    repo.mkdir(parents=True, exist_ok=True)
    cascade_version = version or next_version(repo, name)
    teacher_name = f"{name}-teacher"
    teacher_version = version or next_version(repo, teacher_name)
    targets = ((name, cascade_version),) if model else ((name, cascade_version), (teacher_name, teacher_version))
    for n, v in targets:
        if (repo / n / str(v)).exists():
            raise ExportError(f"{repo / n / str(v)} already exists: versions are never overwritten")

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


def export_network(exporter: Exporter, network: str, repo: Path, name: str, version: int) -> tuple[Path, Manifest]:
    """One network of the run as a one-stage model, measured against the run's teacher."""
    teacher_logits = torch_logits(exporter.networks["teacher"], exporter.test.images)
    teacher_accuracy = float((teacher_logits.argmax(-1) == exporter.test.labels).mean())
    out = write_version(repo, name, version, lambda tmp: exporter.single(tmp, network, name, version, teacher_accuracy))
    ModelRepository(repo).load(name, version)  # final check: as a server would load it
    return out


def export_cascade(exporter: Exporter, stage_names: list[str], repo: Path, name: str, version: int,
                   teacher_version: int, *, target_drop_pt: float | None, flops_budget_pct: float | None,
                   combine: str = "sum", fallback: str | None = None
                   ) -> tuple[tuple[Path, Manifest], tuple[Path, Manifest]]:
    """The teacher as NAME-teacher, then the cascade as NAME (naming that teacher version): both or neither."""
    teacher_name = f"{name}-teacher"
    teacher_dir, teacher = write_version(
        repo, teacher_name, teacher_version,
        lambda tmp: exporter.single(tmp, "teacher", teacher_name, teacher_version, None))
    try:
        cascade = write_version(
            repo, name, version,
            lambda tmp: exporter.cascade(tmp, stage_names, name, version, teacher.metrics.adaptive_accuracy,
                                         target_drop_pt=target_drop_pt, flops_budget_pct=flops_budget_pct,
                                         combine=combine, fallback=fallback,
                                         teacher_model=f"{teacher_name}:{teacher_version}"))
    except BaseException:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        raise
    ModelRepository(repo).load(name, version)  # final check: as a server would load them
    ModelRepository(repo).load(teacher_name, teacher_version)
    return cascade, (teacher_dir, teacher)


def _runtime(folder: Path) -> CascadeRuntime:
    # The folder is renamed to its version only at the end, so its name is not checked here.
    return CascadeRuntime(folder, device=Device.cpu(), check_folder_name=False)
