"""`reskd device-train`, the GPU host's job, rehearsed end to end on the CPU with the plan's tiny schedule on real
Fashion-MNIST: steps in order, each leaving its result before the next, a re-run that trains nothing, a pack that
restores the run, and the shell entry point that runs the checkout without installing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import real_fashion_mnist_or_fail
from reskd.training import loop
from reskd.training.device_train import PART_BYTES, Plan, device_train, unpack_dir

pytestmark = pytest.mark.rehearsal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(monkeypatch):
    calls = []
    real_fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: calls.append(kw["desc"]) or real_fit(*a, **kw))
    return calls


@pytest.mark.real_data
def test_steps_leave_their_results_resume_and_pack(tmp_path, trained):
    real_fashion_mnist_or_fail()
    plan = Plan.load("fashion-mnist-gpu")
    out, pack = tmp_path / "run", tmp_path / "pack"
    # A session cut off after its first step: the teacher candidates are there, packed, and nothing else.
    progress = device_train(plan, out, tiny=True, device="cpu", pack=pack, steps=("teacher",), log=lambda m: None)
    assert trained == ["teacher", "teacher"]  # tiny teachers miss 95%: every candidate is tried, smallest first
    assert [t["label"] for t in progress["teacher"]["tried"]] == [c["label"] for c in plan.teacher_candidates]
    assert progress["teacher"]["target_reached"] is False
    best = max(progress["teacher"]["tried"], key=lambda t: t["val_accuracy"])
    assert progress["teacher"]["chosen"] == best["label"]
    unpack_dir(pack, tmp_path / "first")
    assert not (tmp_path / "first" / "main").exists()
    assert json.loads((tmp_path / "first" / "progress.json").read_text()).keys() == {"teacher"}

    # The next session resumes: the teacher loads, the cascade and the baselines train.
    trained.clear()
    progress = device_train(plan, out, tiny=True, device="cpu", pack=pack, log=lambda m: None)
    assert trained[:2] == ["student", "res1"] and "teacher" not in trained  # the recipe's one res-student
    assert all(name.startswith("kd-") for name in trained[2:]) and len(trained) > 2
    assert set(progress) == {"teacher", "cascade", "baselines"}
    report = json.loads((out / "main" / "report.json").read_text())
    assert report["independent_cascade"] is not None and report["kd_grid"]
    parts = sorted(pack.glob("run.tar.part*"))
    assert parts and all(p.stat().st_size <= PART_BYTES for p in parts)
    unpack_dir(pack, tmp_path / "back")
    for f in (out / "main" / "checkpoints").iterdir():
        assert (tmp_path / "back" / "main" / "checkpoints" / f.name).read_bytes() == f.read_bytes()

    trained.clear()
    device_train(plan, out, tiny=True, device="cpu", log=lambda m: None)
    assert trained == []  # everything was there


@pytest.mark.real_data
def test_the_shell_entry_runs_the_checkout_as_reskd(tmp_path):
    """bench/device_train.sh as the GPU host runs it (here on the CPU, the wheels already in the environment)."""
    real_fashion_mnist_or_fail()
    data = tmp_path / "data"
    data.mkdir()
    for f in Path(real_fashion_mnist_or_fail()).glob("*-ubyte.gz"):
        (data / f.name).symlink_to(f)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RUN_OUT": str(tmp_path / "run"),
           "RESKD_DEVICE_SITE": sysconfig.get_paths()["purelib"],
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_train.sh"), "--tiny", "--device", "cpu",
                           "--steps", "teacher", "--data-root", str(data)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = json.loads(done.stdout)["teacher"]["chosen"]
    assert chosen
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0] == "run.tar.part000"

    # A fresh machine after that call: the parts it brought back, carried along, are restored and resumed from.
    env = {**env, "OUT": str(tmp_path / "out2"), "RUN_OUT": str(tmp_path / "run2"),
           "RESKD_DEVICE_RESUME": str(tmp_path / "out")}
    again = subprocess.run(["bash", str(ROOT / "bench" / "device_train.sh"), "--tiny", "--device", "cpu",
                            "--steps", "teacher", "--data-root", str(data)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the run carried in" in again.stderr
    assert "teacher epoch" not in again.stderr, again.stderr[-3000:]  # nothing trained again
    assert json.loads(again.stdout)["teacher"]["chosen"] == chosen


@pytest.mark.real_data
def test_a_step_cut_off_mid_way_has_packed_its_epochs(tmp_path, monkeypatch):
    """With pack_every_s=0 the run is packed after every epoch's partial checkpoint, inside the step: what a
    device call cut off mid-step brings back holds the epochs trained so far."""
    real_fashion_mnist_or_fail()
    from reskd.training import device_train as dt

    seen = []
    real_pack = dt.pack_dir
    monkeypatch.setattr(dt, "pack_dir", lambda src, dest: seen.append(
        sorted(str(p.relative_to(src)) for p in Path(src).rglob("*.pt"))) or real_pack(src, dest))
    plan = Plan.load("fashion-mnist-gpu")
    device_train(plan, tmp_path / "run", tiny=True, device="cpu", pack=tmp_path / "pack", pack_every_s=0,
                 steps=("teacher",), log=lambda m: None)
    first = plan.teacher_candidates[0]["label"]
    # the first pack comes after the first candidate's only epoch, before its stage finished
    assert seen[0] == [f"teacher-{first}/checkpoints/partial/teacher.pt"], seen
    assert len(seen) == len(plan.teacher_candidates) + 1  # one per candidate's epoch, one at the step's end
