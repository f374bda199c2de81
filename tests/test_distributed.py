"""Training under torchrun: 2 CPU ranks (gloo) against one process, `reskd train` as ranks (the README's smoke run,
an interrupted run resumed mid-stage), and what stops every rank: a global batch that does not split, recipes that
differ, a rank without the data, a rank that dies or hangs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import real_fashion_mnist_or_fail, tiny_recipe_dict, write_recipe_toml
from server_process import children_of, free_port
from test_resume import wait_for

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TRAIN = ["-m", "reskd.cli", "train"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_ranks_train_what_one_process_trains(tmp_path):
    """Same samples, augmentations and global batch: with synchronised batch-norm the weights after 6 steps equal
    the one-process run's to 1e-5; without it they do not (each rank normalises by its own half). Every rank holds
    the same weights, and a rank whose weights drift stops every rank."""
    script = ROOT / "tests" / "ddp_steps.py"
    one = run([sys.executable, script, tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    synced = run([*TORCHRUN, script, tmp_path / "synced", "--sync-bn", "--diverge"])
    assert synced.returncode == 0, synced.stderr
    plain = run([*TORCHRUN, script, tmp_path / "plain"])
    assert plain.returncode == 0, plain.stderr

    reference = weights(tmp_path / "one" / "weights-rank0.pt")
    rank0, rank1 = (weights(tmp_path / "synced" / f"weights-rank{r}.pt") for r in (0, 1))
    assert max_difference(reference, rank0) < 1e-5
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bit for bit, batch-norm statistics included
    assert max_difference(reference, weights(tmp_path / "plain" / "weights-rank0.pt")) > 1e-3
    # The history counts both ranks' samples: the one-process figures.
    history = torch.load(tmp_path / "synced" / "weights-rank0.pt", weights_only=False)["history"]
    one_history = torch.load(tmp_path / "one" / "weights-rank0.pt", weights_only=False)["history"]
    assert [h["accuracy"] for h in history] == [h["accuracy"] for h in one_history]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in one_history], abs=1e-5)
    for r in (0, 1):
        assert (tmp_path / "synced" / f"diverged-rank{r}.txt").read_text() == \
            "after the nudge: the weights of rank(s) 1 differ from rank 0's; the ranks no longer train one model"
    # World.stop freed the process group: its threads are gone before the interpreter exits (a group left to the
    # exit aborted a rank now and then, World.stop says how).
    for run_dir in ("synced", "plain"):
        for r in (0, 1):
            before, after = (tmp_path / run_dir / f"threads-rank{r}.txt").read_text().split()
            assert after == before, (run_dir, r, before, after)


def test_the_readme_smoke_run_trains_every_stage_on_two_ranks(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m reskd.cli train --recipe fashion-mnist-cpu --tiny --device cpu`
    on the real data: every stage trained, rank 0 alone writes and reports."""
    real_fashion_mnist_or_fail()
    out = tmp_path / "run"
    result = run([*TORCHRUN, *TRAIN, "--recipe", "fashion-mnist-cpu", "--tiny", "--device", "cpu", "--out", out])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("% of teacher FLOPs ->") == 1, result.stdout  # rank 0's summary line only
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["world_size"] == 2
    names = {p.stem for p in (out / "checkpoints").glob("*.pt")}
    assert {"teacher", "student", "res1", "res2", "kd-resnet8", "kd-resnet14"} <= names
    for stage in ("teacher", "student"):
        assert result.stderr.count(f"{stage} epoch 1/1:") == 1  # one progress line per epoch, from rank 0


def small_recipe(tmp_path: Path, root: Path | str, teacher_epochs: int = 3) -> Path:
    recipe = tiny_recipe_dict(root, res_students=[{"arch": "resnet8", "width": 0.25}],
                              baselines={"kd_grid": [], "independent_cascade": [], "epochs": 1})
    recipe["train"] = {**recipe["train"], "epochs": 1, "sync_batchnorm": True, "autocast": "fp32"}
    recipe["teacher"] = {**recipe["teacher"], "epochs": teacher_epochs}
    return write_recipe_toml(tmp_path / "recipe.toml", recipe)


def test_an_interrupted_distributed_run_resumes_mid_stage(tiny_idx, tmp_path):
    """Killed after the teacher's first epoch, resumed with --resume under torchrun: the teacher continues from its
    partial checkpoint and ends with the weights of a run that was never interrupted."""
    recipe = small_recipe(tmp_path, tiny_idx, teacher_epochs=4)
    whole = run([*TORCHRUN, *TRAIN, "--recipe", recipe, "--device", "cpu", "--out", tmp_path / "whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "cut"
    cmd = [str(c) for c in [*TORCHRUN, *TRAIN, "--recipe", recipe, "--device", "cpu", "--out", out]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoints" / "partial" / "teacher.pt", proc)
    finally:  # torchrun and its ranks (children of its agent), as a machine that goes down
        family, pending = [], [proc.pid]
        while pending:
            pid = pending.pop()
            family.append(pid)
            pending += children_of(pid)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "checkpoints" / "teacher.pt").exists(), "the run finished the teacher before it was cut"
    resumed = run([*TORCHRUN, *TRAIN, "--recipe", recipe, "--device", "cpu", "--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] teacher: epoch " in resumed.stderr
    a = torch.load(tmp_path / "whole" / "checkpoints" / "teacher.pt", weights_only=False)
    b = torch.load(out / "checkpoints" / "teacher.pt", weights_only=False)
    state_a, state_b = (c["state_dict"] if isinstance(c, dict) else c.state_dict for c in (a, b))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_a_sweep_runs_under_torchrun(tiny_idx, tmp_path):
    """`reskd sweep` as 2 ranks: every variant trained by both, the shared teacher once, rank 0's summary."""
    small_recipe(tmp_path, tiny_idx, teacher_epochs=1)
    (tmp_path / "sweep.toml").write_text(
        'base = "recipe.toml"\n[[axes]]\nname = "student"\n'
        'variants = [{ label = "s25", "student.width" = 0.25 }, { label = "s375", "student.width" = 0.375 }]\n')
    out = tmp_path / "out"
    result = run([*TORCHRUN, "-m", "reskd.cli", "sweep", "--sweep", tmp_path / "sweep.toml", "--out", out,
                  "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["variant"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == ["s25", "s375"]
    assert result.stderr.count("teacher epoch 1/1:") == 1  # trained once (by the first variant), logged once
    assert result.stdout.count("Test columns are for reading, not choosing") == 1  # rank 0's summary alone
    for variant in ("s25", "s375"):
        assert json.loads((out / variant / "report.json").read_text())["environment"]["world_size"] == 2


def ranks(cmds: list[list], cwds: list[Path], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Two ranks started by hand (torchrun starts every rank with the same arguments): rank r runs cmds[r] in
    cwds[r]."""
    port = free_port()
    procs = []
    for r, (cmd, cwd) in enumerate(zip(cmds, cwds)):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def nothing_written(out: Path) -> bool:
    return not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_bad_distributed_input_stops_every_rank_and_writes_nothing(tiny_idx, tmp_path):
    recipe = small_recipe(tmp_path, tiny_idx)
    # A global batch that does not split over the ranks (50 is the recipe's; 51 here).
    out = tmp_path / "odd"
    result = run([*TORCHRUN, *TRAIN, "--recipe", recipe, "--device", "cpu", "--out", out,
                  "--set", "train.batch_size=51"])
    assert result.returncode != 0
    message = "batch_size 51 does not split evenly over 2 ranks"
    assert "reskd train (rank 0 of 2)" in result.stderr and "reskd train (rank 1 of 2)" in result.stderr
    assert result.stderr.count(message) >= 2, result.stderr[-3000:]
    assert nothing_written(out)

    # Recipes that differ between ranks.
    out = tmp_path / "differ"
    base = [sys.executable, *TRAIN, "--recipe", recipe, "--device", "cpu", "--out", out]
    results = ranks([base, [*base, "--set", "teacher.epochs=5"]], [ROOT, ROOT])
    for r, result in enumerate(results):
        assert result.returncode == 2, result.stderr
        assert f"reskd train (rank {r} of 2): the recipe (file and --set overrides) differs between ranks" in \
            result.stderr
    assert nothing_written(out)

    # A rank without the data: the recipe names a relative data root, which only rank 0's directory holds.
    here, there = tmp_path / "node0", tmp_path / "node1"
    here.mkdir(), there.mkdir()
    (here / "data").symlink_to(tiny_idx)
    relative = small_recipe(tmp_path, "data")
    out = tmp_path / "nodata"
    results = ranks([[sys.executable, *TRAIN, "--recipe", relative, "--device", "cpu", "--out", out]] * 2,
                    [here, there])
    for r, result in enumerate(results):
        assert result.returncode == 2, result.stderr
        assert f"reskd train (rank {r} of 2): rank 1: " in result.stderr, result.stderr
    assert "rank 0: " not in results[0].stderr.split("rank 1: ")[0].split("): ")[1]
    assert nothing_written(out)


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_run_with_a_clear_message(tiny_idx, tmp_path, how):
    """Rank 1 killed (its connections close: rank 0 learns at once) or stopped (SIGSTOP: alive and silent, so only
    --dist-timeout can tell): rank 0 exits 1 saying so, in the first case at once, in the second within the timeout."""
    recipe = small_recipe(tmp_path, tiny_idx, teacher_epochs=200)
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for r in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, *TRAIN, "--recipe", str(recipe), "--device", "cpu", "--out",
                                       str(out), "--dist-timeout", "20"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        wait_for(out / "checkpoints" / "partial" / "teacher.pt", procs[0])
        procs[1].send_signal(signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        started = time.monotonic()
        _, stderr = procs[0].communicate(timeout=90)
        took = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()  # a stopped process too
            p.wait()
    assert procs[0].returncode == 1, stderr[-3000:]
    assert "reskd train (rank 0 of 2): the process group failed: another rank died or did not answer within " \
           "--dist-timeout 20 s" in stderr, stderr[-3000:]
    if how == "dies":
        assert took < 25
    else:  # no sooner than the timeout can tell a silent rank from a slow one, and not much later
        assert 15 < took < 60, took


def test_the_training_job_manifest_is_valid(tmp_path):
    """deploy/k8s/training: an indexed Job and its headless Service, valid against Kubernetes' schemas; the Job's
    torchrun command reaches rank 0's pod through that Service."""
    import kubernetes_validate

    folder = ROOT / "deploy" / "k8s" / "training"
    docs = [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
    job = next(d for d in docs if d["kind"] == "Job")
    service = next(d for d in docs if d["kind"] == "Service")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    command = " ".join(pod["containers"][0]["command"] + pod["containers"][0].get("args", []))
    assert f"{job['metadata']['name']}-0.{service['metadata']['name']}" in command
    assert f"--nnodes {spec['completions']}" in command or f"--nnodes={spec['completions']}" in command
    assert "-m reskd.cli train" in command
