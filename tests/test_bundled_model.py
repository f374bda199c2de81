"""The bundled model repository (models/): small enough for git, loadable, and as accurate on the real
Fashion-MNIST test set as its manifest claims."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import real_fashion_mnist_or_fail
from reskd.export.exporter import eval_sets
from reskd.manifest import ModelRepository
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from reskd.training.data import load_fashion_mnist

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_bundled_repository_is_small_and_loads():
    size = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert size <= 16 * 1024 * 1024, f"models/ is {size / 2**20:.1f} MiB, over the 16 MiB budget"
    repo = ModelRepository(MODELS)
    assert {"fashion-mnist", "fashion-mnist-teacher"} <= set(repo.models())
    _, cascade = repo.load("fashion-mnist")
    _, teacher = repo.load("fashion-mnist-teacher")
    assert len(cascade.stages) >= 2 and len(teacher.stages) == 1
    assert cascade.teacher.flops == teacher.stages[0].flops
    assert (cascade.input.channels, cascade.input.height, cascade.input.width) == (1, 28, 28)


@pytest.fixture(scope="module")
def real_test_set():
    real_fashion_mnist_or_fail()
    path, manifest = ModelRepository(MODELS).load("fashion-mnist")
    return eval_sets(manifest.source.data, manifest.input)[1]


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["fashion-mnist", "fashion-mnist-teacher"])
def test_bundled_metrics_hold_on_the_real_test_set(name, real_test_set):
    path, manifest = ModelRepository(MODELS).load(name)
    rt = CascadeRuntime(path)
    result = rt.run(real_test_set.images)
    every = rt.all_stage_logits(real_test_set.images)
    m = manifest.metrics
    assert m.n == len(real_test_set.labels) == 10_000
    assert 100 * (result.class_id == real_test_set.labels).mean() == pytest.approx(100 * m.adaptive_accuracy,
                                                                                    abs=0.05)
    for s, claimed in enumerate(m.stage_accuracy):
        measured = (every[s].argmax(-1) == real_test_set.labels).mean()
        assert 100 * measured == pytest.approx(100 * claimed, abs=0.05)
    assert result.flops.mean() == pytest.approx(m.mean_flops, rel=1e-3)
    assert np.bincount(result.exit_stage, minlength=rt.num_stages).tolist() == pytest.approx(m.exit_counts, abs=5)


@pytest.mark.real_data
def test_png_files_and_tensors_give_identical_classes(tmp_path, real_test_set):
    """Real test images written as PNG files and read back through reskd.preprocess classify exactly as the
    normalised tensors straight from the IDX files."""
    arrays, _ = load_fashion_mnist(None, download=False)
    images = arrays["test"][0][:2000, 0]
    path, manifest = ModelRepository(MODELS).load("fashion-mnist")
    rt = CascadeRuntime(path)
    decoded = []
    for i, img in enumerate(images):
        f = tmp_path / f"{i}.png"
        Image.fromarray(img).save(f)
        decoded.append(preprocess(f.read_bytes(), manifest.input))
    from_png = rt.run(np.stack(decoded))
    from_tensor = rt.run(real_test_set.images[:2000])
    assert np.array_equal(from_png.class_id, from_tensor.class_id)
    assert np.array_equal(from_png.exit_stage, from_tensor.exit_stage)
    # an 8-bit JPEG of the same image is a lossy copy: most classes survive it, and nothing breaks
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="JPEG", quality=95)
    assert preprocess(buf.getvalue(), manifest.input).shape == (1, 28, 28)
