"""PyTorch networks -> ONNX graphs: one graph per stage, a dynamic batch axis, float32 in and out.

Precision: fp32, or fp16 (weights and activations in half precision inside the graph; images in and logits out stay
float32, so nothing else changes). bf16 is not offered: ONNX's Conv takes bfloat16 only from opset 22, which
onnxruntime's CPU and CUDA kernels do not run for convolutions.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from reskd.manifest import IMAGES

Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


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


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])
