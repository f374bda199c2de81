import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import real_fashion_mnist_or_fail, tiny_recipe_dict, write_recipe_toml
from reskd.training import loop
from reskd.training.pipeline import Trainer
from reskd.training.recipe import RecipeError
from reskd.training.sweep import doubling, doubling_choice, run_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "training" / "sweeps"


def write_base_recipe(path: Path, root: Path) -> None:
    """The tiny recipe as TOML (enough for a sweep's base)."""
    r = tiny_recipe_dict(root, baselines={"kd_grid": [{"arch": "resnet8", "width": 0.375}], "epochs": 1})
    r["res_students"] = r["res_students"][:1]
    write_recipe_toml(path, r)


def test_sweep_shares_identical_stages_and_selects_on_validation(tiny_idx, tmp_path, monkeypatch):
    write_base_recipe(tmp_path / "base.toml", tiny_idx)
    (tmp_path / "sweep.toml").write_text('''
base = "base.toml"
select_max_pct_teacher_flops = 100.0
[[axes]]
name = "student"
variants = [{ label = "s25", "student.width" = 0.25 }, { label = "s50", "student.width" = 0.5 }]
[fixed]
"teacher.epochs" = 2
[[axes]]
name = "loss"
variants = [{ label = "mse" }, { label = "ce", "res_students.0.ce_weight" = 1.0 }]
''')
    trained = []
    real_fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: trained.append(kw["desc"]) or real_fit(*a, **kw))
    predicted = []
    real_predict = loop.predict
    monkeypatch.setattr(loop, "predict", lambda *a, **kw: predicted.append(1) or real_predict(*a, **kw))
    rows = run_sweep(str(tmp_path / "sweep.toml"), str(tmp_path / "out"), device="cpu")
    # a shared stage is evaluated once on validation and test: teacher, baseline, 2 students, 4 res-students
    assert len(predicted) == 2 * (1 + 1 + 2 + 4)
    assert [r["variant"] for r in rows] == ["s25_mse", "s25_ce", "s50_mse", "s50_ce"]
    run = json.loads((tmp_path / "out" / "s25_mse" / "run.json").read_text())
    assert run["recipe"]["teacher"]["epochs"] == 2  # [fixed] reached every variant
    # one teacher and one KD baseline for the whole sweep, one student per student setting, a res-student each
    assert trained.count("teacher") == 1 and trained.count("kd-resnet8x0.375") == 1
    assert trained.count("student") == 2 and trained.count("res1") == 4
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    best = max(rows, key=lambda r: (r["val_adaptive"], -r["val_adaptive_pct_teacher_flops"]))
    assert summary["selected"]["variant"] == best["variant"]
    assert "Test columns are for reading, not choosing" in (tmp_path / "out" / "sweep.md").read_text()
    # A rerun resumes: nothing is trained again, and finished variants are read back, not evaluated again...
    trained.clear()
    evaluated = []
    real_run = Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self, *a, **kw: evaluated.append(self.run_dir.path.name) or
                        real_run(self, *a, **kw))
    assert run_sweep(str(tmp_path / "sweep.toml"), str(tmp_path / "out"), device="cpu") == rows
    assert trained == [] and evaluated == []
    # ...unless something changed since its report (here a checkpoint written later).
    ckpt = tmp_path / "out" / "s50_ce" / "checkpoints" / "res1.pt"
    shared_logits = dict(np.load(tmp_path / "out" / "s50_ce" / "logits.npz"))
    ckpt.touch()
    ckpt.touch()  # --only: the named variants run; any other out of date is left alone, not summarised
    only = run_sweep(str(tmp_path / "sweep.toml"), str(tmp_path / "out"), device="cpu", only=["s25_ce"])
    assert trained == [] and evaluated == [] and [r["variant"] for r in only] == ["s25_mse", "s25_ce", "s50_mse"]
    run_sweep(str(tmp_path / "sweep.toml"), str(tmp_path / "out"), device="cpu")
    assert trained == [] and evaluated == ["s50_ce"]
    # evaluated on its own, from its checkpoints: the logits it had been given by earlier variants
    fresh = dict(np.load(tmp_path / "out" / "s50_ce" / "logits.npz"))
    assert fresh.keys() == shared_logits.keys()
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], shared_logits[key], err_msg=key)
    with pytest.raises(RecipeError, match="no variant labelled s99"):
        run_sweep(str(tmp_path / "sweep.toml"), str(tmp_path / "out"), device="cpu", only=["s99"])


def report_with(val: dict[str, float], full: float) -> dict:
    return {"models": {n: {"val_accuracy": v} for n, v in val.items()},
            "cascade": {"depths": [{"val_accuracy": 0.0}, {"val_accuracy": full}]}}


def test_doubling_pairs_keep_the_shorter_count_below_the_gain():
    reports = {"a30": report_with({"student": 90.00, "kd-resnet8": 91.0}, 92.00),
               "a60": report_with({"student": 90.19, "kd-resnet8": 91.2}, 92.50)}
    entries = [{"model": "student", "pairs": [["a30", "a60"]]}, {"model": "kd-resnet8", "pairs": [["a30", "a60"]]},
               {"model": "cascade", "pairs": [["a30", "a60"]]}, {"model": "kd-resnet14", "pairs": [["a30", "a60"]]},
               {"model": "student", "pairs": [["a30", "missing"]]}]
    pairs = doubling(entries, reports, 0.2)
    # kd-resnet14 is in neither report and the missing variant was not reported: no pair for them
    assert [(p["model"], p["gain_pt"], p["keeps"]) for p in pairs] == [
        ("student", 0.19, "shorter"), ("kd-resnet8", 0.2, "longer"), ("cascade", 0.5, "longer")]
    assert pairs[0]["val_shorter"] == 90.0 and pairs[0]["val_longer"] == 90.19


def test_the_doubling_pairs_choose_the_variant_axis_by_axis():
    spec = {"axes": [{"name": "kd", "variants": [{"label": "kd30"}, {"label": "kd60"}]},
                     {"name": "head", "variants": [{"label": "head30"}, {"label": "head60"}]}]}

    def pair(short, long, keeps):
        return {"shorter": short, "longer": long, "keeps": keeps}

    kd = [pair("kd30_head30", "kd60_head30", "shorter"), pair("kd30_head30", "kd60_head30", "longer")]
    head = [pair("kd30_head30", "kd30_head60", "longer"), pair("kd60_head30", "kd60_head60", "shorter")]
    # one KD model worth 60 epochs moves the axis; the head is then judged at kd60, not at kd30
    assert doubling_choice(spec, kd + head) == {"axes": {"kd": "kd60", "head": "head30"}, "variant": "kd60_head30"}
    assert doubling_choice(spec, kd[:1] + head)["variant"] == "kd30_head60"
    # no measured head pair at the chosen kd count: undecided, and so no variant
    assert doubling_choice(spec, kd + head[:1]) == {"axes": {"kd": "kd60", "head": None}, "variant": None}
    assert doubling_choice(spec, head[1:])["axes"] == {"kd": None, "head": None}


def test_a_doubling_pair_naming_no_variant_fails_before_anything_trains(tiny_idx, tmp_path, monkeypatch):
    write_base_recipe(tmp_path / "base.toml", tiny_idx)
    trained = []
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: trained.append(kw["desc"]))
    axes = '[[axes]]\nvariants = [{ label = "e1" }, { label = "e2", "teacher.epochs" = 2 }]\n'
    (tmp_path / "typo.toml").write_text('base = "base.toml"\n' + axes
                                        + '[[doubling]]\nmodel = "teacher"\npairs = [["e1", "e3"]]\n')
    with pytest.raises(RecipeError, match="names no variant e3"):
        run_sweep(str(tmp_path / "typo.toml"), str(tmp_path / "out"), device="cpu")
    (tmp_path / "shape.toml").write_text('base = "base.toml"\n' + axes + '[[doubling]]\npairs = [["e1"]]\n')
    with pytest.raises(RecipeError, match="needs `model`"):
        run_sweep(str(tmp_path / "shape.toml"), str(tmp_path / "out"), device="cpu")
    assert trained == []


def test_a_bad_variant_fails_before_anything_trains(tiny_idx, tmp_path, monkeypatch):
    write_base_recipe(tmp_path / "base.toml", tiny_idx)
    (tmp_path / "sweep.toml").write_text('''
base = "base.toml"
[[axes]]
name = "teacher"
variants = [{ label = "ok" }, { label = "typo", "teacher.arch" = "resnet9" }]
''')
    trained = []
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: trained.append(kw["desc"]))
    with pytest.raises(RecipeError, match="unknown arch 'resnet9'"):
        run_sweep(str(tmp_path / "sweep.toml"), str(tmp_path / "out"), device="cpu")
    assert trained == []
    (tmp_path / "nolabel.toml").write_text('base = "base.toml"\n[[axes]]\nvariants = [{ "teacher.epochs" = 2 }]\n')
    with pytest.raises(RecipeError, match="each with a `label`"):
        run_sweep(str(tmp_path / "nolabel.toml"), str(tmp_path / "out2"), device="cpu")


@pytest.mark.real_data
@pytest.mark.rehearsal
@pytest.mark.parametrize("sweep,variants", [("fashion-mnist-gpu.toml", 6), ("fashion-mnist-cpu-ablation.toml", 22),
                                            ("fashion-mnist-reference.toml", 4)])
def test_the_bundled_sweeps_run_end_to_end_on_cpu_with_tiny(tmp_path, sweep, variants):
    """The GPU sweep and the CPU ablation, whole grids, on real Fashion-MNIST with each file's tiny schedule: a
    typo costs a test run, not hours of training."""
    real_fashion_mnist_or_fail()
    rows = run_sweep(str(SWEEPS / sweep), str(tmp_path / "sweep"), tiny=True, device="cpu")
    assert len(rows) == variants
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["selected"] is None or summary["selected"]["variant"] in {r["variant"] for r in rows}
    for row in rows:
        assert (tmp_path / "sweep" / row["variant"] / "report.md").is_file()
    spec = tomllib.loads((SWEEPS / sweep).read_text())
    # every [[doubling]] pair of the file is summarised (the reference's: student, head, both KD baselines)
    assert len(summary["doubling"]) == sum(len(e["pairs"]) for e in spec.get("doubling", []))
    if summary["doubling"]:
        assert "Epoch counts checked by doubling" in (tmp_path / "sweep" / "sweep.md").read_text()
        assert summary["doubling_choice"]["variant"] in {r["variant"] for r in rows}
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    shutil.rmtree(tmp_path / "sweep")


def test_only_shares_the_finished_stages_of_a_variant_another_process_is_training(tiny_idx, tmp_path, monkeypatch):
    """Two processes split a sweep with --only: the second variant's process takes the teacher and the KD baseline
    the first variant already finished, though the first is still training its later stages (no report yet)."""
    write_base_recipe(tmp_path / "base.toml", tiny_idx)
    (tmp_path / "sweep.toml").write_text('''
base = "base.toml"
[[axes]]
name = "student"
variants = [{ label = "s25", "student.width" = 0.25 }, { label = "s50", "student.width" = 0.5 }]
''')
    trained = []
    real_fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: trained.append(kw["desc"]) or real_fit(*a, **kw))
    out = tmp_path / "out"
    run_sweep(str(tmp_path / "sweep.toml"), str(out), device="cpu", only=["s25"])
    assert sorted(trained) == ["kd-resnet8x0.375", "res1", "student", "teacher"]
    # as the first process would have left it while still training res1: nothing linked into s50 yet
    (out / "s25" / "checkpoints" / "res1.pt").unlink()
    shutil.rmtree(out / "s50")
    trained.clear()
    rows = run_sweep(str(tmp_path / "sweep.toml"), str(out), device="cpu", only=["s50"])
    assert sorted(trained) == ["res1", "student"] and [r["variant"] for r in rows] == ["s50"]
    for shared in ("teacher.pt", "kd-resnet8x0.375.pt"):
        assert (out / "s50" / "checkpoints" / shared).samefile(out / "s25" / "checkpoints" / shared)
