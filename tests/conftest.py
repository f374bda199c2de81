"""Shared fixtures: small generated datasets in the real on-disk formats, and a tiny recipe that trains in seconds."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (unsigned bytes): magic 0x00000800 | ndim, big-endian dims, then the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_images(n: int, classes: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class a fixed coarse (4x4-block) random template, each sample it plus pixel noise.
    Coarse templates survive the random-crop augmentation, so the tiny models learn them in a few epochs."""
    rng = np.random.default_rng(1234)
    coarse = rng.uniform(0, 255, size=(classes, channels, -(-size // 4), -(-size // 4)))
    templates = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :size, :size]
    r = np.random.default_rng(seed)
    labels = r.integers(0, classes, n)
    images = np.clip(templates[labels] * 0.6 + r.normal(0, 40, (n, channels, size, size)) + 50, 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped dataset (IDX .gz files), 12x12 pixels: 700 train, 200 test, 10 classes."""
    root = tmp_path_factory.mktemp("tiny-idx")
    for split, n, seed in (("train", 700, 0), ("t10k", 200, 1)):
        images, labels = make_images(n, 10, 12, 1, seed)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def tiny_recipe_dict(root: Path, **sections) -> dict:
    recipe = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "root": str(root), "val_size": 100},
        "train": {"epochs": 2, "batch_size": 50, "lr": 0.05, "eval_batch_size": 128},
        "teacher": {"arch": "resnet8", "width": 0.5, "epochs": 3},
        "student": {"arch": "resnet8", "width": 0.25},
        "res_students": [{"arch": "resnet8", "width": 0.25}, {"arch": "resnet8", "width": 0.25, "ce_weight": 0.5}],
        "baselines": {"kd_grid": [{"arch": "resnet8", "width": 0.25}, {"arch": "resnet8", "width": 0.375}],
                      "independent_cascade": [{"arch": "resnet8", "width": 0.25}, {"arch": "resnet8", "width": 0.375}],
                      "epochs": 2},
        "evaluation": {"bootstrap_samples": 50},
    }
    for key, value in sections.items():
        recipe[key] = value
    return recipe


def real_fashion_mnist_or_fail() -> Path:
    """The real data, which CI installs: under CI=true its absence is a failure, elsewhere a skip."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    message = f"real Fashion-MNIST missing from {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
