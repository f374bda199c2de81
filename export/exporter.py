"""`reskd export`: a run directory -> two new versions in a model repository: the cascade (NAME: student and
res-students, one ONNX file each) and its teacher (NAME-teacher, a single stage), so one server can serve both.

Each stage is exported with a dynamic batch axis, then checked against PyTorch on every validation image (max
|logit difference| reported, argmax agreement must be 100%). Thresholds are calibrated through the runtime, and the
cascade's exit stages under them must be the same whether the stages run in PyTorch or in onnxruntime. A version is
written to a temporary folder and renamed into place only when everything passed; an existing version is never
overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from reskd.device import Device
from reskd.exit_policy import confidence, exit_stages
from reskd.manifest import InputSpec, ModelRepository, sha256_file, write_manifest
from reskd.preprocess import normalise
from reskd.runtime import CascadeRuntime
from reskd.training.data import load_dataset
from reskd.training.flops import count_flops
from reskd.training.models import ModelSpec, build_model
from reskd.training.pipeline import CHECKPOINT_DIR, RUN_FILE
from reskd.training.recipe import DataConfig, parse_recipe

from .calibrate import EvalSet, calibrate_version, measure_test


class ExportError(RuntimeError):
    pass


def load_stage_model(run_dir: Path, name: str) -> torch.nn.Module:
    path = run_dir / CHECKPOINT_DIR / f"{name}.pt"
    if not path.is_file():
        raise ExportError(f"{path} is missing: is the run finished? (reskd train --resume completes it)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelSpec(ckpt["arch"], ckpt["width"]), ckpt["in_channels"], ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, int, int]) -> None:
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


def _write_version(repo: Path, name: str, version: int, build) -> Path:
    """build(tmp_dir) fills a temporary folder; it is renamed to REPO/NAME/VERSION only if build succeeds."""
    final = repo / name / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists: versions are never overwritten; pick another --version")
    (repo / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=repo / name))
    try:
        build(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_run(run_dir: str | Path, repo: str | Path, name: str, version: int | None = None, *,
               target_drop_pt: float | None = None, flops_budget_pct: float | None = None,
               model: str | None = None, log=print) -> dict:
    """model=None: the cascade as NAME and its teacher as NAME-teacher. model="kd-resnet8" (any checkpoint of the
    run): that one network alone as a one-stage NAME, measured against the run's teacher (for baselines)."""
    run_dir, repo = Path(run_dir), Path(repo)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise ExportError(f"{run_file} is missing: RUN_DIR must be a directory written by `reskd train`")
    run = json.loads(run_file.read_text())
    recipe = parse_recipe(run["recipe"])
    d = run["data"]
    repo.mkdir(parents=True, exist_ok=True)
    cascade_version = version or next_version(repo, name)
    teacher_name = f"{name}-teacher"
    teacher_version = version or next_version(repo, teacher_name)
    targets = ((name, cascade_version),) if model else ((name, cascade_version), (teacher_name, teacher_version))
    for n, v in targets:
        if (repo / n / str(v)).exists():
            raise ExportError(f"{repo / n / str(v)} already exists: versions are never overwritten")

    stage_names = [model] if model else ["student"] + [f"res{k + 1}" for k in range(len(recipe.res_students))]
    if model is not None and not (run_dir / CHECKPOINT_DIR / f"{model}.pt").is_file():
        have = sorted(p.stem for p in (run_dir / CHECKPOINT_DIR).glob("*.pt"))
        raise ExportError(f"the run has no model {model!r} (checkpoints: {', '.join(have) or 'none'})")
    models = {n: load_stage_model(run_dir, n) for n in dict.fromkeys(["teacher", *stage_names])}
    shape = (d["channels"], d["height"], d["width"])
    flops = {n: count_flops(m, shape) for n, m in models.items()}
    input_spec = {"channels": d["channels"], "height": d["height"], "width": d["width"],
                  "color": "L" if d["channels"] == 1 else "RGB",
                  "resize": "fit-center" if recipe.data.dataset == "imagefolder" else "bilinear",
                  "mean": d["mean"], "std": d["std"]}
    val, test = eval_sets(run["recipe"]["data"], InputSpec(**input_spec), d["val_ids"])
    log(f"validation {len(val.labels)} / test {len(test.labels)} images")
    source = {"run": str(run_dir), "recipe": recipe.name, "data": run["recipe"]["data"],
              "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__}
    calib = recipe.evaluation
    results = {}  # filled by the builders: the teacher's test accuracy, then both manifests
    if target_drop_pt is None and flops_budget_pct is None:
        target_drop_pt = calib.target_drop_pt

    def base_manifest(model_name, v, stages, thresholds):
        return {"name": model_name, "version": v, "labels": d["labels"], "input": input_spec, "stages": stages,
                "teacher": {"flops": flops["teacher"], "accuracy": results.get("teacher_accuracy")},
                "exit": {"measure": calib.exit_measure, "thresholds": thresholds}, "metrics": {}, "source": source}

    def write_stages(tmp: Path, names: list[str]) -> list[dict]:
        stages = []
        for i, n in enumerate(names):
            file = f"stage{i}-{n}.onnx"
            export_onnx(models[n], tmp / file, shape)
            stages.append({"name": n, "file": file, "sha256": sha256_file(tmp / file), "flops": flops[n]})
        return stages

    def check_parity(rt: CascadeRuntime, names: list[str]) -> tuple[dict, list[np.ndarray]]:
        report, torch_outs = {}, []
        for i, n in enumerate(names):
            ref = torch_logits(models[n], val.images)
            got = np.concatenate([rt.stage_logits(i, val.images[j:j + 1000]) for j in range(0, len(val.images), 1000)])
            agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
            report[n] = {"max_abs_logit_diff": float(np.abs(ref - got).max()), "argmax_agreement": agree,
                         "n": int(len(ref))}
            log(f"parity {n}: max |dlogit| {report[n]['max_abs_logit_diff']:.2e}, argmax agreement {agree:.4%}")
            if agree < 1.0:
                raise ExportError(f"parity failed for stage {n}: ONNX and PyTorch disagree on the class of "
                                  f"{int(round((1 - agree) * len(ref)))} validation images")
            torch_outs.append(ref)
        return report, torch_outs

    def build_cascade(tmp: Path) -> None:
        stages = write_stages(tmp, stage_names)
        write_manifest(tmp, base_manifest(name, cascade_version, stages, [1.0] * (len(stages) - 1)))
        rt = _runtime(tmp)
        parity, torch_outs = check_parity(rt, stage_names)
        manifest = calibrate_version(tmp, val, test, target_drop_pt=target_drop_pt, flops_budget_pct=flops_budget_pct,
                                     bound=calib.bound, z=calib.bound_z, runtime=rt)
        # The exits PyTorch's logits would give under the calibrated thresholds must be the runtime's.
        running = np.cumsum(np.stack([o.astype(np.float64) for o in torch_outs]), axis=0)
        torch_exits = exit_stages(confidence(running, calib.exit_measure), manifest["exit"]["thresholds"])
        rt_exits = rt.run(val.images).exit_stage
        differ = int((torch_exits != rt_exits).sum())
        parity["exit_stage_agreement"] = 1.0 - differ / len(rt_exits)
        if differ:
            raise ExportError(f"parity failed: {differ} validation images exit at another stage in onnxruntime than "
                              "in PyTorch under the calibrated thresholds")
        manifest["parity"] = parity
        write_manifest(tmp, manifest)
        results["cascade"] = manifest

    def build_single(key: str, model_name: str, v: int):
        def build(tmp: Path) -> None:
            write_manifest(tmp, base_manifest(model_name, v, write_stages(tmp, [key]), []))
            rt = _runtime(tmp)
            parity, _ = check_parity(rt, [key])
            metrics = measure_test(rt, test, flops["teacher"], results.get("teacher_accuracy"))
            if key == "teacher":
                results["teacher_accuracy"] = metrics["teacher_accuracy"] = metrics["adaptive_accuracy"]
            manifest = json.loads((tmp / "manifest.json").read_text())
            manifest["teacher"]["accuracy"] = results["teacher_accuracy"]
            manifest["metrics"] = metrics
            manifest["parity"] = parity
            write_manifest(tmp, manifest)
            results[key] = manifest
        return build

    if model is not None:
        teacher_logits = torch_logits(models["teacher"], test.images)
        results["teacher_accuracy"] = float((teacher_logits.argmax(-1) == test.labels).mean())
        out = _write_version(repo, name, cascade_version, build_single(model, name, cascade_version))
        ModelRepository(repo).load(name, cascade_version)
        return {"model": str(out), "model_manifest": results[model]}

    teacher_dir = _write_version(repo, teacher_name, teacher_version, build_single("teacher", teacher_name,
                                                                                  teacher_version))
    try:
        cascade_dir = _write_version(repo, name, cascade_version, build_cascade)
    except BaseException:
        shutil.rmtree(teacher_dir, ignore_errors=True)  # both or neither
        raise
    ModelRepository(repo).load(name, cascade_version)  # final check: as a server would load it
    ModelRepository(repo).load(teacher_name, teacher_version)
    return {"cascade": str(cascade_dir), "teacher": str(teacher_dir), "cascade_manifest": results["cascade"],
            "teacher_manifest": results["teacher"]}


def _runtime(tmp: Path) -> CascadeRuntime:
    # The folder is renamed to its version only at the end, so its name is not checked here.
    return CascadeRuntime(tmp, device=Device.cpu(), check_folder_name=False)
