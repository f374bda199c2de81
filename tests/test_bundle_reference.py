"""`make bundle-reference` (reskd.export.reference) on the reference sweep's tiny rehearsal: refused until every
doubling pair is measured; then the chosen variant as three versions, the independent cascade naming the bundled
teacher, nothing ever overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import real_fashion_mnist_or_fail
from reskd.export.reference import BundleError, bundle, default_rule, main
from reskd.manifest import ModelRepository
from reskd.runtime import CascadeRuntime
from reskd.training.sweep import run_sweep

SWEEP = Path(__file__).resolve().parents[1] / "training" / "sweeps" / "fashion-mnist-reference.toml"


@pytest.mark.real_data
@pytest.mark.rehearsal
def test_the_reference_is_bundled_from_the_variant_its_doubling_pairs_chose(tmp_path, capsys):
    real_fashion_mnist_or_fail()
    sweep_dir, repo = tmp_path / "sweep", tmp_path / "repo"
    run_sweep(str(SWEEP), str(sweep_dir), tiny=True, device="cpu", only=["kd30_head30", "kd60_head30"])
    # half the grid: the head's pairs are unmeasured, so nothing is exported
    with pytest.raises(BundleError, match="the sweep has not finished; unmeasured doubling pairs: cascade "
                                          "kd30_head30/kd30_head60, cascade kd60_head30/kd60_head60"):
        bundle(sweep_dir, SWEEP, repo, "fashion-mnist", 3, 2, 25.0)
    assert not repo.exists()

    run_sweep(str(SWEEP), str(sweep_dir), tiny=True, device="cpu")
    choice = json.loads((sweep_dir / "sweep.json").read_text())["doubling_choice"]["variant"]
    capsys.readouterr()  # the sweep's own output
    assert main(["--sweep-dir", str(sweep_dir), "--sweep", str(SWEEP), "--repo", str(repo)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["variant"] == choice and out["run"] == str(sweep_dir / choice)
    assert out["versions"] == ["fashion-mnist:3", "fashion-mnist-teacher:3", "fashion-mnist-independent:2"]
    models = ModelRepository(repo)
    _, reskd = models.load("fashion-mnist", 3)
    _, teacher = models.load("fashion-mnist-teacher", 3)
    _, independent = models.load("fashion-mnist-independent", 2)
    assert [s.name for s in reskd.stages] == ["student", "res1", "teacher"]
    assert reskd.stage_combine == ["sum", "sum", "replace"]
    assert [s.name for s in independent.stages] == ["student", "kd-resnet8", "kd-resnet14", "teacher"]
    assert independent.stage_combine == ["replace"] * 4
    # one teacher network for all three, named by both cascades
    assert reskd.stages[-1].sha256 == independent.stages[-1].sha256 == teacher.stages[0].sha256
    assert reskd.teacher.model == independent.teacher.model == "fashion-mnist-teacher:3"
    assert reskd.source.data == independent.source.data
    # the copied version serves: its fallback stage is its audit reference
    assert independent.audit is not None and independent.audit.stage == 3
    assert CascadeRuntime(repo / "fashion-mnist-independent" / "2").num_stages == 4
    # a second bundle into the same repository is refused before anything is written
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    assert main(["--sweep-dir", str(sweep_dir), "--sweep", str(SWEEP), "--repo", str(repo)]) == 2
    assert "fashion-mnist/3 already exists: versions are never overwritten" in capsys.readouterr().err
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before

    # the default point's rule: the recipe's where it fits the FLOPs bound on validation, else that budget
    run = sweep_dir / choice
    report = json.loads((run / "report.json").read_text())
    point = report["fallback"]["cascades"]["ResKD + teacher"]["points"]["calibrated"]
    pct = 100 * point["val_mean_flops"] / report["teacher_flops"]
    assert default_rule(run, pct + 0.01)["flops_budget_pct"] is None
    assert default_rule(run, pct - 0.01)["flops_budget_pct"] == pytest.approx(pct - 0.01)


def test_a_missing_sweep_is_refused_saying_what_to_run(tmp_path, capsys):
    assert main(["--sweep-dir", str(tmp_path / "nothing"), "--repo", str(tmp_path / "repo")]) == 2
    assert "sweep.json does not exist: run the sweep first (make train-reference)" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
