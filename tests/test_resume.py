"""Resuming inside a stage: while a stage trains, RUN_DIR/checkpoints/partial/NAME.pt holds its state after its
last finished epoch, and `reskd train --resume` goes on from there as if the run had never stopped."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe_dict
from reskd.training import loop
from reskd.training.batches import Normalizer
from reskd.training.data import TensorSplit
from reskd.training.pipeline import Trainer, train
from reskd.training.recipe import TrainConfig, parse_recipe
from reskd.training.rundir import PartialCheckpoint, RunDir, RunDirError

# Both runs compute with one thread: a different thread count may split a reduction differently.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RES_EPOCHS = 6

RECIPE = """
name = "resume"
seed = 0
[data]
dataset = "fashion-mnist"
root = "{root}"
val_size = 100
[train]
epochs = 2
batch_size = 50
lr = 0.05
eval_batch_size = 128
[teacher]
arch = "resnet8"
width = 0.25
[student]
arch = "resnet8"
width = 0.25
[[res_students]]
arch = "resnet8"
width = 0.25
epochs = {res_epochs}
[evaluation]
bootstrap_samples = 10
"""


def reskd_train(recipe, out, *more) -> list[str]:
    return [sys.executable, "-m", "reskd.cli", "train", "--recipe", str(recipe), "--out", str(out), "--device", "cpu",
            *more]


def wait_for(path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.005)


def test_a_run_killed_inside_a_stage_resumes_to_the_same_weights(tiny_idx, tmp_path):
    """A run killed (SIGKILL) while res1 trains, then resumed: teacher and student load from their checkpoints,
    res1 continues after its last saved epoch, and every checkpoint is bit-identical to an uninterrupted run's
    (same recipe and seed, one thread): weights, batch-norm buffers, per-epoch history, residual_scale_sq, and
    the logits they give."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=tiny_idx, res_epochs=RES_EPOCHS))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    with open(tmp_path / "whole.log", "w") as log:
        reference = subprocess.Popen(reskd_train(recipe, whole), env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        with open(tmp_path / "cut.log", "w") as log:
            victim = subprocess.Popen(reskd_train(recipe, cut), env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(RunDir(cut).partial_path("res1"), victim)  # written after res1's first epoch
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        run = RunDir(cut)
        assert run.checkpoint_names() == ["student", "teacher"]  # killed inside res1
        partial = run.load_partial("res1")
        done = partial.progress.epoch
        assert 1 <= done < RES_EPOCHS

        resumed = subprocess.run(reskd_train(recipe, cut, "--resume"), env=ENV, capture_output=True, text=True,
                                 timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        for name in ("teacher", "student"):
            assert f"[resume] {name}: loaded {run.checkpoint_path(name)}" in resumed.stderr
        assert f"[resume] res1: epoch {done + 1}/{RES_EPOCHS} from {run.partial_path('res1')}" in resumed.stderr
        assert not run.partials.exists()  # removed once res1.pt was written
        assert reference.wait(timeout=120) == 0, (tmp_path / "whole.log").read_text()
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    assert run.checkpoint_names() == RunDir(whole).checkpoint_names() == ["res1", "student", "teacher"]
    for name in run.checkpoint_names():
        got, want = run.load_checkpoint(name), RunDir(whole).load_checkpoint(name)
        assert got.fingerprint == want.fingerprint
        assert got.state_dict.keys() == want.state_dict.keys()
        for key, value in want.state_dict.items():
            assert torch.equal(got.state_dict[key], value), f"{name}.{key} differs from the uninterrupted run"
        seconds_apart = [[{k: v for k, v in h.items() if k != "seconds"} for h in ckpt.history] for ckpt in (got, want)]
        assert seconds_apart[0] == seconds_apart[1], name
        assert {k: v for k, v in got.extra.items() if k != "train_seconds"} == \
               {k: v for k, v in want.extra.items() if k != "train_seconds"}
    assert "residual_scale_sq" in run.load_checkpoint("res1").extra
    assert run.load_checkpoint("res1").extra["train_seconds"] >= partial.seconds  # both attempts count
    got, want = np.load(run.logits_file), np.load(RunDir(whole).logits_file)
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
        assert np.array_equal(got[key], want[key]), key


def test_a_partial_checkpoint_needs_resume_and_the_same_settings(tiny_idx, tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(tiny_idx, baselines={}))
    run = RunDir(tmp_path / "run")
    # Only the fingerprint is read before the refusal: an empty training state will do.
    run.save_partial(PartialCheckpoint("teacher", "another-setting", loop.Progress([], {}, {}, {}, {}), {}, 1.0))
    assert run.checkpoint_names() == [] and run.partial_names() == ["teacher"]
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        Trainer(recipe, run.path, device="cpu")
    with pytest.raises(RunDirError, match=r"partial/teacher\.pt was trained with other settings than the recipe now "
                                          r"gives for stage 'teacher'; delete that partial checkpoint .* or use "
                                          r"another --out"):
        train(recipe, run.path, resume=True, device="cpu")


def test_fit_resumed_from_its_progress_continues_exactly(tiny_idx):
    """loop.fit alone, on a model with dropout (which draws from the global RNG): resumed after epoch 2 into a
    freshly initialised model, with the global RNG moved on, it ends where the uninterrupted fit ended."""
    torch.manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (200, 1, 12, 12), dtype=torch.uint8), torch.randint(0, 10, (200,)),
                        np.arange(200))
    cfg = TrainConfig(epochs=4, batch_size=50, lr=0.05)
    norm = Normalizer([0.5], [0.25], torch.device("cpu"))

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 32), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))

    def fit(model, **kw) -> list[dict]:
        def step(x, y):
            logits = model(x)
            return F.cross_entropy(logits, y), logits

        return loop.fit(model, step, split, cfg, normalizer=norm, device=torch.device("cpu"), seed=7, desc="t", **kw)

    whole, saved = make(), []
    history = fit(whole, on_epoch=lambda progress: saved.append(copy.deepcopy(progress)))
    assert [p.epoch for p in saved] == [1, 2, 3, 4] and saved[-1].history == history

    torch.manual_seed(123)
    again = make()
    rest = fit(again, resume=saved[1])
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in rest] == \
           [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    for key, value in whole.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
