"""ONNX against PyTorch, on every validation image: each stage's own logits, the running logits through it (what
exits and answers are made of), every other output it declares, and, under calibrated thresholds, the exit stage of
every image. A version whose graphs disagree beyond what its precision allows is never written.

fp32 must agree on every argmax. fp16 rounds logits by ~1e-3, which may flip a near-tie: the running logits' argmax
and the exit stages within MIN_AGREEMENT (a res-student's own output is a small correction whose argmax alone means
nothing, so rounding flips it freely).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from reskd.cascade import running_logits
from reskd.exit_policy import confidence, exit_stages
from reskd.manifest import IMAGES, Manifest, StageParity, StageSpec
from reskd.runtime import CascadeRuntime

from .errors import ExportError

# The least argmax agreement with the fp32 PyTorch network (per stage) and exit-stage agreement (cascade) a
# version may have, by precision: fp32 must agree everywhere; fp16 rounds logits by ~1e-3, which may flip a
# near-tie, at most 1 validation image in 500 here.
MIN_AGREEMENT: dict[str, float] = {"fp32": 1.0, "fp16": 0.998}
# The largest difference a carried output (e.g. a feature map) may show against PyTorch, relative to the largest
# magnitude PyTorch gives it, by precision. What matters downstream is checked anyway: the logits of the stages
# that read it.
MAX_RELATIVE_DIFF: dict[str, float] = {"fp32": 1e-3, "fp16": 5e-2}


@torch.no_grad()
def torch_outputs(networks: dict[str, torch.nn.Module], stages: list[StageSpec],
                  images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """PyTorch's logits and declared outputs of every stage on every image (the reference)."""
    out: list[dict[str, list]] = [{} for _ in stages]
    for j in range(0, len(images), 1000):
        values = {IMAGES: torch.from_numpy(images[j:j + 1000])}
        for s, stage in enumerate(stages):
            model, x = networks[stage.name], values[stage.inputs[0].source]
            if stage.outputs:
                features = model.features(x)
                values[f"{stage.name}.features"] = features
                got = {"logits": model.logits_from_features(features), "features": features}
            else:
                got = {"logits": model(x)}
            for name, value in got.items():
                out[s].setdefault(name, []).append(value.numpy())
    return [{name: np.concatenate(v) for name, v in o.items()} for o in out]


def check_parity(networks: dict[str, torch.nn.Module], rt: CascadeRuntime, images: np.ndarray, precision: str,
                 log: Callable[[str], None]) -> tuple[dict[str, StageParity], list[np.ndarray]]:
    """Every stage of the version `rt` runs against its PyTorch network, on `images` (the validation split).
    -> (parity per stage, PyTorch's logits per stage). Raises ExportError."""
    report, torch_outs = {}, []
    stages = rt.manifest.stages
    refs, gots = torch_outputs(networks, stages, images), rt.graph_outputs(images)
    kinds = rt.manifest.stage_combine
    ref_running = running_logits([r["logits"] for r in refs], kinds)
    got_running = running_logits([g["logits"] for g in gots], kinds)
    floor = MIN_AGREEMENT[precision]
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
            log(f"parity {n}.{o.name} ({precision}): max |diff| {diff:.2e} (largest value {scale:.2f})")
            if diff > MAX_RELATIVE_DIFF[precision] * scale:
                raise ExportError(f"parity failed for output {n}.{o.name}: ONNX ({precision}) differs from "
                                  f"PyTorch by up to {diff:.3g} on values up to {scale:.3g} (at most "
                                  f"{MAX_RELATIVE_DIFF[precision]:.0e} of it may)")
        extra = {"max_abs_output_diff": others} if others else {}
        report[n] = StageParity(max_abs_logit_diff=float(np.abs(ref - got).max()), argmax_agreement=agree,
                                running_argmax_agreement=running, n=len(ref), **extra)
        log(f"parity {n} ({precision}): max |dlogit| {report[n].max_abs_logit_diff:.2e}, argmax "
            f"agreement {agree:.4%}, running logits {running:.4%}")
        worst = min(agree, running) if precision == "fp32" else running
        if worst < floor:
            raise ExportError(f"parity failed for stage {n}: ONNX ({precision}) and PyTorch disagree on the "
                              f"class of {int(round((1 - worst) * len(ref)))} validation images (at most "
                              f"{1 - floor:.1%} may)")
        torch_outs.append(ref)
    return report, torch_outs


def check_exits(torch_outs: list[np.ndarray], rt: CascadeRuntime, manifest: Manifest, images: np.ndarray,
                precision: str, log: Callable[[str], None]) -> float:
    """The exits PyTorch's logits (`torch_outs`, per stage) would give under the manifest's calibrated thresholds
    must be the runtime's, on `images`. -> the agreement. Raises ExportError."""
    running = running_logits(torch_outs, rt.manifest.stage_combine)
    torch_exits = exit_stages(confidence(running, manifest.exit.measure), manifest.exit.thresholds)
    rt_exits = rt.run(images).exit_stage
    differ = int((torch_exits != rt_exits).sum())
    agreement = 1.0 - differ / len(rt_exits)
    log(f"exit-stage agreement with PyTorch (fp32) under the calibrated thresholds: {agreement:.4%}")
    if agreement < MIN_AGREEMENT[precision]:
        raise ExportError(f"parity failed: {differ} validation images exit at another stage in onnxruntime "
                          f"({precision}) than in PyTorch under the calibrated thresholds")
    return agreement
