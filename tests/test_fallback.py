"""A cascade that can reach its teacher: per-stage combine (summed stages, then a fallback stage whose logits replace
the running logits), the operating points stored in the manifest (exactly what the runtime does on validation),
the teacher named as a model version, `reskd export --fallback` from a run and `reskd compose` from a repository,
and every way of getting them wrong refused with a message naming the field, nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import load_stage, real_fashion_mnist_or_fail, real_test_images, session_reference
from reskd.cli import main
from reskd.device import Device
from reskd.exit_policy import confidence, exit_stages
from reskd.export.compose import compose_fallback
from reskd.export.command import export_run
from reskd.export.errors import ExportError
from reskd.export.runs import eval_sets
from reskd.manifest import ManifestError, ModelRepository, load_manifest, sha256_file
from reskd.runtime import CascadeRuntime
from reskd.scoring import ScoreOptions, score
from reskd.scoring.output import read_output
from server_process import BUNDLED

FALLBACK = BUNDLED / "fashion-mnist-fallback" / "1"


# -- the manifest ------------------------------------------------------------------------------------------------

def test_a_stage_without_its_own_combine_takes_the_cascades():
    raw = json.loads((FALLBACK / "manifest.json").read_text())
    assert "combine" not in raw["stages"][0] and raw["stages"][2]["combine"] == "replace"
    assert load_manifest(FALLBACK).stage_combine == ["sum", "sum", "replace"]
    assert load_manifest(BUNDLED / "fashion-mnist" / "1").stage_combine == ["sum"] * 3  # an old manifest
    assert load_manifest(BUNDLED / "fashion-mnist-independent" / "1").stage_combine == ["replace"] * 3


def _edited(tmp_path, edit):
    folder = tmp_path / "1"
    shutil.copytree(FALLBACK, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    edit(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))
    return folder


def _point(raw, point_id):
    return next(p for p in raw["operating_points"]["points"] if p["id"] == point_id)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stages"][2].update(combine="average"), r"stages\.2\.combine: Input should be 'sum' or 'replace'"),
    (lambda m: m["teacher"].update(model="fashion-mnist-teacher"),
     r"teacher\.model: 'fashion-mnist-teacher' should be NAME:VERSION"),
    (lambda m: m["teacher"].update(model="teacher:v2"), r"teacher\.model: 'teacher:v2' should be NAME:VERSION"),
    (lambda m: _point(m, "depth-1").update(thresholds=[1.0]),
     r"operating_points\.points\.0 \(depth-1\)\.thresholds: needs 2 values"),
    (lambda m: _point(m, "depth-1").update(max_stage=3), r"\(depth-1\)\.max_stage: 3 is past the last stage \(2\)"),
    (lambda m: _point(m, "depth-1").update(exit_fractions=[0.5, 0.5, 0.0]),
     r"\(depth-1\)\.exit_fractions: needs 3 values \(one per stage\), none after max_stage"),
    (lambda m: _point(m, "depth-1").update(exit_fractions=[0.5, 0.0, 0.0]), r"exit_fractions must be >= 0 and sum"),
    (lambda m: m["operating_points"].update(default="fastest"),
     r"operating_points: default 'fastest' is not the id of a point \(ids: depth-1, "),
    (lambda m: _point(m, "depth-1").update(id="default"), r"operating_points: the points' ids must be unique"),
    (lambda m: m["exit"].update(thresholds=[0.5, 0.5]),
     r"operating_points: the default point 'default' .* is not what exit\.thresholds holds .*reskd calibrate"),
    (lambda m: m["stages"].pop(), r"exit\.thresholds needs 1 values"),
])
def test_a_manifest_whose_fallback_points_or_teacher_disagree_is_refused_naming_the_field(tmp_path, edit, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_edited(tmp_path, edit))


# -- the bundled fallback version --------------------------------------------------------------------------------

def test_where_the_fallback_answers_it_answers_with_the_teachers_own_logits():
    rt = CascadeRuntime(FALLBACK, device=Device.cpu())
    teacher = CascadeRuntime(BUNDLED / "fashion-mnist-teacher" / "2", device=Device.cpu())
    assert rt.manifest.teacher.model == "fashion-mnist-teacher:2"
    x = np.random.default_rng(0).normal(size=(64, 1, 28, 28)).astype(np.float32)
    got = rt.run(x, threshold=0.999)
    reached = got.exit_stage == 2
    assert 0 < reached.sum() < 64
    np.testing.assert_allclose(got.logits[reached], teacher.run(x[reached]).logits, atol=1e-5)
    assert (got.flops[reached] == rt.cum_flops[2]).all() and rt.cum_flops[2] > rt.manifest.teacher.flops
    logits, exits = session_reference(rt, x)
    standard = rt.run(x)
    np.testing.assert_array_equal(standard.exit_stage, exits)
    np.testing.assert_allclose(standard.logits, logits, atol=1e-4)


@pytest.fixture(scope="module")
def validation():
    real_fashion_mnist_or_fail()
    manifest = load_manifest(FALLBACK)
    return eval_sets(manifest.source.data, manifest.input)[0]


@pytest.mark.real_data
def test_every_stored_operating_point_is_what_the_runtime_does_on_validation(validation):
    """Each point of the bundled fallback version's curve, run through the runtime on the real validation split,
    gives exactly its stored accuracy, mean FLOPs and exit fractions; the curve runs from the first stage alone to
    every stage, cheapest first, each point more accurate than every cheaper one but the kept ones."""
    rt = CascadeRuntime(FALLBACK, device=Device.cpu())
    points = rt.manifest.operating_points
    assert points.split == "validation" and points.n == len(validation.labels) == 5000
    ids = [p.id for p in points.points]
    assert ids[0] == "depth-1" and ids[-1] == "depth-3" and points.default == "default" and "default" in ids
    full = rt.run(validation.images, threshold=1.0).class_id == validation.labels
    flops = [p.mean_flops for p in points.points]
    assert flops == sorted(flops)
    for i, p in enumerate(points.points):
        got = rt.run(validation.images, point=p.id)
        correct = got.class_id == validation.labels
        assert correct.mean() == p.accuracy, p.id
        assert got.flops.mean() == p.mean_flops, p.id
        assert (np.bincount(got.exit_stage, minlength=3) / len(correct)).tolist() == p.exit_fractions, p.id
        assert got.exit_stage.max() <= p.max_stage
        assert p.pct_teacher_flops == pytest.approx(100 * p.mean_flops / rt.manifest.teacher.flops)
        assert p.diff_vs_full_pt == pytest.approx(100 * (correct.mean() - full.mean()), abs=1e-9)
        lo, hi = p.diff_ci95_pt
        assert lo <= p.diff_vs_full_pt + 0.02 and p.diff_vs_full_pt - 0.02 <= hi
        if p.id not in ("default", "depth-1", "depth-3"):
            assert p.accuracy > max(q.accuracy for q in points.points[:i]), p.id
    default = points.point("default")
    assert default.thresholds == rt.manifest.exit.thresholds and default.max_stage == 2
    assert default.accuracy == rt.manifest.calibration.accuracy
    assert default.mean_flops == rt.manifest.calibration.mean_flops
    with pytest.raises(ValueError, match="fashion-mnist-fallback:1 has no operating point 'fastest'; its points "
                                         "are depth-1, "):
        rt.run(validation.images[:2], point="fastest")


def test_calibrate_list_prints_the_stored_curve_and_changes_nothing(capsys):
    before = sha256_file(FALLBACK / "manifest.json")
    assert main(["calibrate", "--repo", str(BUNDLED), "--model", "fashion-mnist-fallback:1", "--list"]) == 0
    out = capsys.readouterr().out
    points = load_manifest(FALLBACK).operating_points.points
    rows = [line for line in out.splitlines()[2:] if line.strip()]
    assert [r.split()[0] for r in rows] == [p.id for p in points]
    assert sum("(default)" in r for r in rows) == 1 and "(default)" in rows[[p.id for p in points].index("default")]
    assert sha256_file(FALLBACK / "manifest.json") == before
    assert main(["calibrate", "--repo", str(BUNDLED), "--model", "fashion-mnist:2", "--list"]) == 0
    assert "no operating points" in capsys.readouterr().out


@pytest.mark.real_data
def test_scoring_the_fallback_version_gives_the_sessions_answer(tmp_path):
    from reskd.preprocess import preprocess

    files = []
    for i, data in enumerate(real_test_images(24)):
        files.append(tmp_path / f"{i:02d}.png")
        files[-1].write_bytes(data)
    out = tmp_path / "scores.jsonl"
    score(ScoreOptions(repo=str(BUNDLED), model="fashion-mnist-fallback:1", inputs=[str(tmp_path)], out=str(out),
                       workers=0, progress=False))
    rows = read_output(out).to_pylist()
    rt = CascadeRuntime(FALLBACK, device=Device.cpu())
    images = np.stack([preprocess(f.read_bytes(), rt.manifest.input) for f in files])
    logits, exits = session_reference(rt, images)
    assert [r["exit_stage"] for r in rows] == exits.tolist()
    assert [r["class_id"] for r in rows] == logits.argmax(-1).tolist()
    assert [r["flops"] for r in rows] == rt.cum_flops[exits].tolist()


def test_a_point_gives_the_defaults_that_threshold_and_max_stage_override():
    """A request's operating point replaces the calibrated thresholds and last stage; an explicit max_stage or
    threshold then replaces the point's. "default" is the calibrated point, on a version without a curve too."""
    rt = CascadeRuntime(FALLBACK, device=Device.cpu())
    x = np.random.default_rng(5).normal(size=(200, 1, 28, 28)).astype(np.float32)
    point = rt.manifest.operating_points.point("budget-20")
    conf = confidence(rt.all_stage_logits(x), rt.manifest.exit.measure)
    capped = rt.run(x, point="budget-20", max_stage=1)
    np.testing.assert_array_equal(capped.exit_stage, exit_stages(conf, point.thresholds, max_stage=1))
    assert 0 < (capped.exit_stage == 1).sum() < 200
    overridden = rt.run(x, point="depth-1", threshold=0.9)
    np.testing.assert_array_equal(overridden.exit_stage, exit_stages(conf, [0.9, 0.9], max_stage=0))
    np.testing.assert_array_equal(rt.run(x, point="default").exit_stage, rt.run(x).exit_stage)
    old = CascadeRuntime(BUNDLED / "fashion-mnist" / "2", device=Device.cpu())
    assert old.manifest.operating_points is None
    np.testing.assert_array_equal(old.run(x, point="default").exit_stage, old.run(x).exit_stage)
    with pytest.raises(ValueError, match=r"fashion-mnist:2 has no operating point 'budget-20'; its points are "
                                         r"default \(it was calibrated before curves were stored"):
        old.run(x, point="budget-20")


# -- reskd compose: a fallback from a repository's versions ------------------------------------------------------

@pytest.fixture()
def repo(exported, tmp_path):
    """A copy of the tiny run's exported repository (tiny:1, the cascade; tiny-teacher:1, its teacher)."""
    out = tmp_path / "repo"
    shutil.copytree(exported[0], out)
    return out


def test_compose_appends_the_teacher_as_a_replacing_stage_and_calibrates_it(repo):
    out, manifest = compose_fallback(repo, "tiny-fb", cascade="tiny:1", fallback="tiny-teacher:1", log=lambda m: None)
    base, teacher = load_manifest(repo / "tiny" / "1"), load_manifest(repo / "tiny-teacher" / "1")
    assert out == repo / "tiny-fb" / "1" and [s.name for s in manifest.stages] == ["student", "res1", "res2",
                                                                                     "teacher"]
    assert manifest.stage_combine == ["sum", "sum", "sum", "replace"] and manifest.combine == "sum"
    for stage, (source, original) in zip(manifest.stages, [*((repo / "tiny" / "1", s) for s in base.stages),
                                                            (repo / "tiny-teacher" / "1", teacher.stages[0])]):
        assert sha256_file(out / stage.file) == sha256_file(source / original.file) == stage.sha256
    assert manifest.teacher.model == "tiny-teacher:1" and manifest.teacher.flops == teacher.stages[0].flops
    assert manifest.parity.stages["teacher"] == teacher.parity.stages["teacher"]
    assert manifest.parity.exit_stage_agreement is None  # needs the PyTorch networks: not claimed
    assert manifest.metrics.stage_accuracy[-1] == teacher.metrics.adaptive_accuracy
    assert manifest.operating_points.point("default").thresholds == manifest.exit.thresholds
    assert manifest.source.composed_from == ["tiny:1 stages 0..2", "tiny-teacher:1"]
    rt = CascadeRuntime(out)
    test = eval_sets(manifest.source.data, manifest.input)[1]
    logits, exits = session_reference(rt, test.images)
    got = rt.run(test.images)
    np.testing.assert_array_equal(got.exit_stage, exits)
    np.testing.assert_allclose(got.logits, logits, atol=1e-4)
    two = compose_fallback(repo, "tiny-st", cascade="tiny:1", keep=1, fallback="tiny-teacher:1",
                           log=lambda m: None)[1]
    assert [s.name for s in two.stages] == ["student", "teacher"] and len(two.exit.thresholds) == 1


def _relabelled(repo, name, edit):
    folder = repo / name / "2"
    shutil.copytree(repo / name / "1", folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["version"] = 2
    edit(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("setup, kwargs, message", [
    (None, {"fallback": "tiny:1"}, r"--fallback: tiny:1 has 3 stages; a fallback is a one-stage model"),
    (None, {"fallback": "nope:1"}, r"no model 'nope'"),
    (None, {"fallback": "tiny-teacher:1", "keep": 4}, r"--keep: tiny:1 has 3 stages; keep 1 to 3, got 4"),
    (None, {"fallback": "tiny-teacher:1", "keep": 0}, r"--keep: .* got 0"),
    (lambda r: _relabelled(r, "tiny-teacher", lambda m: m["labels"].reverse()),
     {"fallback": "tiny-teacher:2"}, r"--fallback: tiny-teacher:2's labels differs from tiny:1's"),
    (lambda r: _relabelled(r, "tiny-teacher", lambda m: m["source"]["data"].update(val_size=50)),
     {"fallback": "tiny-teacher:2"}, r"was not trained on tiny:1's data"),
    (lambda r: (r / "tiny-fb" / "1").mkdir(parents=True), {"fallback": "tiny-teacher:1", "version": 1},
     r"tiny-fb/1 already exists"),
])
def test_compose_refuses_what_cannot_be_a_fallback_and_writes_nothing(repo, setup, kwargs, message):
    if setup:
        setup(repo)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with pytest.raises((ExportError, ManifestError), match=message):
        compose_fallback(repo, "tiny-fb", cascade="tiny:1", log=lambda m: None, **kwargs)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


def test_the_compose_command_says_what_to_fix(repo, capsys):
    assert main(["compose", "--repo", str(repo), "--name", "x", "--cascade", "tiny", "--fallback", "tiny"]) == 2
    assert "reskd compose: --fallback: tiny:1 has 3 stages" in capsys.readouterr().err
    assert not (repo / "x").exists()


# -- reskd export --fallback: the run's teacher as the last stage ------------------------------------------------

def test_export_appends_the_runs_teacher_and_answers_as_pytorch_does(tiny_run, tmp_path):
    run_dir = tiny_run[0]
    out = export_run(run_dir, tmp_path, "tiny", fallback="teacher", log=lambda m: None)
    manifest = out["cascade_manifest"]
    assert [s.name for s in manifest.stages] == ["student", "res1", "res2", "teacher"]
    assert manifest.stage_combine == ["sum", "sum", "sum", "replace"]
    assert manifest.teacher.model == "tiny-teacher:1" and ModelRepository(tmp_path).load("tiny-teacher", 1)
    assert manifest.parity.stages["teacher"].running_argmax_agreement == 1.0
    assert manifest.parity.exit_stage_agreement == 1.0
    assert manifest.metrics.stage_accuracy[-1] == out["teacher_manifest"].metrics.adaptive_accuracy
    test = eval_sets(manifest.source.data, manifest.input)[1]
    with torch.no_grad():
        x = torch.from_numpy(test.images)
        summed = sum(load_stage(run_dir, n)[0](x).double() for n in ("student", "res1", "res2"))
        teacher = load_stage(run_dir, "teacher")[0](x).double().numpy()
    rt = CascadeRuntime(tmp_path / "tiny" / "1")
    got = rt.run(test.images, threshold=1.0)
    np.testing.assert_allclose(got.logits, teacher, atol=1e-4)  # not summed.numpy() + teacher
    assert not np.allclose(summed.numpy(), teacher, atol=1e-2)
    # the curve export stored is what the runtime does on the validation split, point by point
    val = eval_sets(manifest.source.data, manifest.input)[0]
    points = manifest.operating_points
    assert points.n == len(val.labels) and points.point(points.default).thresholds == manifest.exit.thresholds
    for p in points.points:
        run = rt.run(val.images, point=p.id)
        assert (run.class_id == val.labels).mean() == p.accuracy and run.flops.mean() == p.mean_flops, p.id
        assert (np.bincount(run.exit_stage, minlength=4) / len(val.labels)).tolist() == p.exit_fractions, p.id


@pytest.mark.parametrize("kwargs, message", [
    ({"fallback": "nope"}, r"--fallback: the run has no network 'nope' \(checkpoints: "),
    ({"fallback": "student"}, r"--fallback: student is already a stage of the cascade"),
    ({"fallback": "teacher", "model": "kd-resnet8x0.375"}, r"--model exports one network: .* nor --fallback"),
])
def test_export_refuses_a_fallback_that_is_not_a_network_of_the_run(tiny_run, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_run(tiny_run[0], tmp_path / "r", "tiny", log=lambda m: None, **kwargs)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.json"))
