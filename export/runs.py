"""What an export reads from a run directory besides its checkpoints: the validation and test images (the run's
own split, normalised exactly as the server will), the input spec, the networks of the independent cascade."""

from __future__ import annotations

import numpy as np

from reskd.manifest import InputSpec
from reskd.preprocess import normalise
from reskd.training.data import load_dataset
from reskd.training.recipe import DataConfig

from .calibrate import EvalSet
from .errors import ExportError


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


def input_spec_of(run_data: dict, recipe) -> InputSpec:
    return InputSpec(channels=run_data["channels"], height=run_data["height"], width=run_data["width"],
                     color="L" if run_data["channels"] == 1 else "RGB",
                     resize="fit-center" if recipe.data.dataset == "imagefolder" else "bilinear",
                     mean=run_data["mean"], std=run_data["std"])


def independent_stages(recipe) -> list[str]:
    """The networks of the recipe's independent-models cascade, in order, by their checkpoint names."""
    specs = [e.spec for e in recipe.baselines.independent_cascade]
    if not specs:
        raise ExportError("the recipe names no baselines.independent_cascade: give the stages with --stages")
    return ["student" if spec == recipe.student.spec else f"kd-{spec.tag}" for spec in specs]
