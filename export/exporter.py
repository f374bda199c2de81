"""Building model versions from a run's networks: the Exporter writes each stage's ONNX graph (onnx.py), checks
it against PyTorch (parity.py), calibrates the thresholds through the runtime (calibrate.py), and writes the
version through the model repository, which renames it into place only when everything passed (an existing version
is never overwritten). `reskd export` (command.py) decides what to build.

Stage inputs: a res-student trained on the student's last feature map (`input = "features"`) is exported as a
graph reading `features`; the student's graph then also outputs `features`, and the manifest declares both (stage
`inputs` / `outputs`), so the runtime carries the map to the samples that reach the head. Parity is checked for
every output of every graph. Cascade kinds: `sum` (ResKD: the student and its res-students) or `replace` (a
confidence cascade of independent models). A fallback network (typically the teacher) is appended as a last stage
whose logits replace the running logits (its stage's `combine` is `replace`): the samples no earlier stage is
confident about get the fallback's answer. Every cascade names its teacher's version (`teacher.model`).

Precision: thresholds are calibrated on the graph of the precision that is served; parity is measured against the
fp32 PyTorch networks whatever the precision, with the tolerance parity.py allows it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from reskd.device import Device
from reskd.manifest import (IMAGES, ExitSpec, InputSpec, Manifest, ModelRepository, ParitySpec, SourceSpec,
                            StageInput, StageOutput, StageParity, StageSpec, TeacherSpec, sha256_file,
                            write_manifest)
from reskd.runtime import CascadeRuntime
from reskd.training.flops import count_flops
from reskd.training.pipeline import feature_shape
from reskd.training.recipe import EvalConfig
from reskd.training.rundir import RunDir

from .calibrate import EvalSet, calibrate_version, measure_test
from .errors import ExportError
from .onnx import Precision, WithFeatures, export_onnx, torch_logits
from .parity import check_exits, check_parity
from .runs import eval_sets, input_spec_of


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

    def check_parity(self, rt: CascadeRuntime) -> tuple[dict[str, StageParity], list[np.ndarray]]:
        """The version `rt` runs against the PyTorch networks on every validation image (parity.py)."""
        return check_parity(self.networks, rt, self.val.images, self.precision, self.log)

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
        agreement = check_exits(torch_outs, rt, manifest, self.val.images, self.precision, self.log)
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


def export_network(exporter: Exporter, network: str, repo: Path, name: str, version: int) -> tuple[Path, Manifest]:
    """One network of the run as a one-stage model, measured against the run's teacher."""
    teacher_logits = torch_logits(exporter.networks["teacher"], exporter.test.images)
    teacher_accuracy = float((teacher_logits.argmax(-1) == exporter.test.labels).mean())
    repository = ModelRepository(repo, create=True)
    out = repository.write_version(name, version,
                                   lambda tmp: exporter.single(tmp, network, name, version, teacher_accuracy))
    repository.load(name, version)  # final check: as a server would load it
    return out


def export_cascade(exporter: Exporter, stage_names: list[str], repo: Path, name: str, version: int,
                   teacher_version: int, *, target_drop_pt: float | None, flops_budget_pct: float | None,
                   combine: str = "sum", fallback: str | None = None
                   ) -> tuple[tuple[Path, Manifest], tuple[Path, Manifest]]:
    """The teacher as NAME-teacher, then the cascade as NAME (naming that teacher version): both or neither."""
    teacher_name = f"{name}-teacher"
    repository = ModelRepository(repo, create=True)
    teacher_dir, teacher = repository.write_version(
        teacher_name, teacher_version,
        lambda tmp: exporter.single(tmp, "teacher", teacher_name, teacher_version, None))
    try:
        cascade = repository.write_version(
            name, version,
            lambda tmp: exporter.cascade(tmp, stage_names, name, version, teacher.metrics.adaptive_accuracy,
                                         target_drop_pt=target_drop_pt, flops_budget_pct=flops_budget_pct,
                                         combine=combine, fallback=fallback,
                                         teacher_model=f"{teacher_name}:{teacher_version}"))
    except BaseException:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        raise
    repository.load(name, version)  # final check: as a server would load them
    repository.load(teacher_name, teacher_version)
    return cascade, (teacher_dir, teacher)


def _runtime(folder: Path) -> CascadeRuntime:
    # The folder is renamed to its version only at the end, so its name is not checked here.
    return CascadeRuntime(folder, device=Device.cpu(), check_folder_name=False)
