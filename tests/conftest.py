"""Shared fixtures: small generated datasets in the real on-disk formats, and a tiny recipe that trains in seconds."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

import lanes
from reskd.training import loop, pipeline
from reskd.training.rundir import RunDir
from reskd.training.pipeline import Trainer, train
from reskd.training.recipe import parse_recipe

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    for marker, what in lanes.LANES.items():  # tests/lanes.py: the lanes and what puts a test in each
        config.addinivalue_line("markers", f"{marker}: {what}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every collected test with its markers, before `-m` deselects any (tests/test_lanes.py reads it)."""
    lanes.collected = {item.nodeid: {m.name for m in item.iter_markers()} for item in items}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The item being set up and run, for tests/lanes.py's check (fixtures start servers during setup)."""
    lanes.current = item


def pytest_runtest_teardown(item):
    lanes.current = None  # a module's shared server stops here, whichever test came last


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


def write_recipe_toml(path: Path, recipe: dict) -> Path:
    """A recipe dict (tiny_recipe_dict) as a TOML file: scalars as JSON writes them (valid TOML), tables inline."""
    def value(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in recipe.items()))
    return path


def real_fashion_mnist_or_fail() -> Path:
    """The real data, which CI installs: under CI=true its absence is a failure, elsewhere a skip."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    message = f"real Fashion-MNIST missing from {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def real_test_images(n: int, fmt: str = "PNG") -> list[bytes]:
    """The first n images of the real Fashion-MNIST test split as image files' bytes (fmt: a Pillow format, or a
    list of formats taken in turn). Fails under CI=true without the data, skips elsewhere."""
    import io

    from PIL import Image

    real_fashion_mnist_or_fail()
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)[:n]
    formats = [fmt] if isinstance(fmt, str) else fmt
    out = []
    for i, img in enumerate(pixels):
        buf = io.BytesIO()
        this = formats[i % len(formats)]
        Image.fromarray(img).save(buf, this, **({"quality": 92} if this == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def load_stage(run_dir, name):
    ckpt = RunDir(run_dir).load_checkpoint(name)
    return ckpt.build(), ckpt


class Spies:
    def __init__(self):
        self.fit_calls: list[tuple[str, np.ndarray]] = []  # (stage, ids of the images it trained on)
        self.residual_calls: list[dict] = []
        self.teacher_input = None
        self.current_res = None


@pytest.fixture(scope="session")
def tiny_run(tiny_idx, tmp_path_factory):
    """The tiny recipe trained once per session, watched by spies on the real functions (they record and pass
    through; nothing is replaced). Returns (run_dir, recipe, report, spies)."""
    run_dir = tmp_path_factory.mktemp("run")
    recipe = parse_recipe(tiny_recipe_dict(tiny_idx))
    spies = Spies()
    mp = pytest.MonkeyPatch()
    real_fit, real_target, real_teacher, real_res = loop.fit, pipeline.residual_target, Trainer.teacher, \
        Trainer.res_student

    def fit_spy(model, step, train_split, cfg, **kw):
        spies.fit_calls.append((kw["desc"], np.asarray(train_split.ids).copy()))
        return real_fit(model, step, train_split, cfg, **kw)

    def teacher_spy(self, data, normalizer):
        stage = real_teacher(self, data, normalizer)
        stage.model.register_forward_pre_hook(lambda m, args: setattr(spies, "teacher_input", args[0].detach()))
        return stage

    def res_spy(self, k, *args, **kwargs):
        spies.current_res = k + 1
        return real_res(self, k, *args, **kwargs)

    def target_spy(teacher_logits, cascade_logits):
        if len([c for c in spies.residual_calls if c["res"] == spies.current_res]) < 3:
            spies.residual_calls.append({"res": spies.current_res, "x": spies.teacher_input.clone(),
                                         "teacher": teacher_logits.detach().clone(),
                                         "cascade": cascade_logits.detach().clone()})
        return real_target(teacher_logits, cascade_logits)

    mp.setattr(loop, "fit", fit_spy)
    mp.setattr(pipeline, "residual_target", target_spy)
    mp.setattr(Trainer, "teacher", teacher_spy)
    mp.setattr(Trainer, "res_student", res_spy)
    try:
        report = train(recipe, run_dir, device="cpu")
    finally:
        mp.undo()
    return run_dir, recipe, report, spies


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """The tiny run exported once per session: (repo, export result)."""
    from reskd.export.command import export_run

    run_dir = tiny_run[0]
    repo = tmp_path_factory.mktemp("repo")
    result = export_run(run_dir, repo, "tiny", log=lambda msg: None)
    return repo, result


def session_reference(rt, x, threshold=None, max_stage=None):
    """What a version's graphs give, computed here from its sessions' own outputs and its manifest file as written,
    not through the runtime: running logits are added (a stage whose combine is "sum") or replaced ("replace"; a
    stage without its own combine takes the cascade's); a sample exits at the first stage whose max probability
    reaches its threshold (the manifest's, or `threshold` for every stage), or at max_stage.
    -> (running logits at the exit stage, exit stages)."""
    raw = json.loads((rt.path / "manifest.json").read_text())
    kinds = [stage.get("combine", raw.get("combine", "sum")) for stage in raw["stages"]]
    running, total = [], 0.0
    for out, kind in zip(rt.graph_outputs(x), kinds):
        total = out["logits"].astype(np.float64) + (total if kind == "sum" else 0.0)
        running.append(total)
    running = np.stack(running)
    thresholds = raw["exit"]["thresholds"] if threshold is None else [threshold] * (len(kinds) - 1)
    last = len(kinds) - 1 if max_stage is None else max_stage
    exits = np.full(len(x), last)
    for i in range(len(x)):
        for s in range(last):
            z = running[s, i] - running[s, i].max()
            if np.exp(z).max() / np.exp(z).sum() >= thresholds[s]:
                exits[i] = s
                break
    return running[exits, np.arange(len(x))], exits


# Servers several test modules need with the same settings, started once per session. Only for tests that change
# no state of the server (no model control, no settings): they send requests, read answers, logs since they began
# and counters as deltas.
SMALL_LIMITS = {"max_images": 4, "max_body_bytes": 300_000}


@pytest.fixture(scope="session")
def small_limits_server():
    """max_images=4, a 300 kB body limit: the 413 paths within reach of small requests (tests/test_serve_errors.py,
    tests/test_serve_protocol.py, tests/test_serve_fuzz.py)."""
    from server_process import ServerProcess

    with ServerProcess(**SMALL_LIMITS) as s:
        yield s


@pytest.fixture(scope="session")
def default_server():
    """The default settings on the test repository (tests/test_serve.py, tests/test_serve_reliability.py)."""
    from server_process import ServerProcess

    with ServerProcess() as s:
        yield s
