"""Shared by the benchmark scripts: the real Fashion-MNIST test set as the bundled models expect it, the bundled
model versions, and the machine description printed with every result."""

from __future__ import annotations

import gzip
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from reskd.manifest import ModelRepository, parse_model_ref
from reskd.preprocess import normalise

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CASCADE, TEACHER = "fashion-mnist", "fashion-mnist-teacher"
KD_MODELS = ("fashion-mnist-kd-resnet8", "fashion-mnist-kd-resnet14")


def idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


def pinned(ref: str) -> tuple[str, int]:
    """NAME:VERSION -> (name, version): a benchmark names the versions it measures, so a newer bundled version
    does not change what a figure means."""
    name, version = parse_model_ref(ref)
    if version is None:
        raise SystemExit(f"name a version explicitly: {ref}:N")
    return name, version


def open_version(ref: str, device=None):
    """The bundled version NAME:VERSION as a CascadeRuntime (on `device`, default the runtime's)."""
    from reskd.runtime import CascadeRuntime

    name, version = pinned(ref)
    return CascadeRuntime(MODELS / name / str(version), device=device)


def test_set() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (uint8 pixels [N, 28, 28], normalised float32 [N, 1, 28, 28], labels [N]) of the official 10k test set."""
    pixels = idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    spec = ModelRepository(MODELS).load(CASCADE)[1].input
    return pixels, normalise(pixels[:, None], spec).astype(np.float32), labels


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        gpu = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{os.cpu_count()} x {cpu}" + (f", GPU {gpu}" if gpu else ", no GPU")
