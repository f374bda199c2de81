"""The tensors a served cascade takes and gives, named once: the KServe v2 metadata, Triton's model configuration
and the infer responses (HTTP and gRPC) are all written from these tables.

Inputs: `images` FP32 [N, C, H, W] (normalised as the manifest says) or `image_bytes` BYTES [N] (encoded images).
Outputs: `logits` FP32 [N, classes], `probabilities` FP32 [N, classes] (their softmax), `class_id` INT64 [N],
`exit_stage` INT32 [N], `flops` INT64 [N], `exit_reason` BYTES [N] (why each image left: confident, final, max_stage,
load or deadline). The two with a class axis can be asked for as Triton's classification extension: the top k
classes of each image as BYTES "value:index:label" (`classify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from reskd.cascade import CascadeResult

from .models import ServedModel


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe v2's name of the element type
    dims: Callable[[ServedModel], list[int]]  # a sample's shape ([] for one value per sample)

    def metadata(self, model: ServedModel) -> dict:
        """KServe v2 model metadata: the batch dimension first, variable (-1)."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims(model)]}

    def config(self, model: ServedModel) -> dict:
        """Triton's model configuration: a sample's dims, a scalar as [1] reshaped to []."""
        dims = self.dims(model)
        entry = {"name": self.name, "data_type": "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}",
                 "dims": dims or [1]}
        if not dims:
            entry["reshape"] = {"shape": []}
        return entry


def probabilities(result: CascadeResult) -> np.ndarray:
    """The softmax of each image's running logits, float64 (what v1's top_k lists)."""
    logits = result.logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def classify(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: each row's k highest scores (ties: the lower index first) as strings
    "value:index:label", value printed as C++'s std::to_string prints a float (six decimals). -> object [N, k]."""
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, -1)
    out = np.empty(order.shape, dtype=object)
    for (i, j), index in np.ndenumerate(order):
        out[i, j] = f"{top[i, j]:f}:{index}:{labels[index]}"
    return out


class Output(Tensor):
    def value(self, result: CascadeResult) -> np.ndarray | list[str]:
        """This output of a cascade result (the result's field of the same name; exit reasons by name)."""
        if self.name == "exit_reason":
            return result.reasons()
        if self.name == "probabilities":
            return probabilities(result)
        return getattr(result, self.name)

    @property
    def per_class(self) -> bool:
        """Whether it has a class axis (so the classification extension applies)."""
        return self.name in ("logits", "probabilities")


INPUTS: dict[str, Tensor] = {t.name: t for t in (
    Tensor("images", "FP32", lambda model: list(model.runtime.input_shape)),
    Tensor("image_bytes", "BYTES", lambda model: []),
)}

OUTPUTS: dict[str, Output] = {t.name: t for t in (
    Output("logits", "FP32", lambda model: [len(model.manifest.labels)]),
    Output("probabilities", "FP32", lambda model: [len(model.manifest.labels)]),
    Output("class_id", "INT64", lambda model: []),
    Output("exit_stage", "INT32", lambda model: []),
    Output("flops", "INT64", lambda model: []),
    Output("exit_reason", "BYTES", lambda model: []),
)}
