"""Export -> model repository -> runtime, on the tiny run: what the runtime answers is what PyTorch computes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import load_stage
from reskd.export import exporter
from reskd.export.command import export_run
from reskd.export.errors import ExportError
from reskd.export.parity import MIN_AGREEMENT
from reskd.export.runs import eval_sets
from reskd.manifest import InputSpec, ManifestError, ModelRepository, load_manifest, sha256_file
from reskd.runtime import CascadeRuntime


@pytest.fixture(scope="module")
def test_set(exported):
    repo, _ = exported
    manifest = load_manifest(repo / "tiny" / "1")
    return eval_sets(manifest.source.data, manifest.input)[1]


def torch_running_logits(run_dir, images):
    out, total = [], 0
    with torch.no_grad():
        for name in ("student", "res1", "res2"):
            total = total + load_stage(run_dir, name)[0](torch.from_numpy(images)).double()
            out.append(total.numpy())
    return np.stack(out)


def test_repository_layout_and_manifest(exported):
    repo, result = exported
    assert ModelRepository(repo).models() == ["tiny", "tiny-teacher"]
    m = load_manifest(repo / "tiny" / "1")
    assert [s.name for s in m.stages] == ["student", "res1", "res2"]
    assert len(m.exit.thresholds) == 2 and m.exit.measure == "max_prob"
    assert m.input.channels == 1 and m.input.color == "L" and (m.input.height, m.input.width) == (12, 12)
    assert m.labels[9] == "Ankle boot"
    t = load_manifest(repo / "tiny-teacher" / "1")
    assert len(t.stages) == 1 and t.exit.thresholds == [] and t.teacher.flops == m.teacher.flops
    assert m.teacher.accuracy == t.metrics.adaptive_accuracy
    assert list(m.parity.stages) == ["student", "res1", "res2"]
    for name, parity in m.parity.stages.items():
        assert parity.argmax_agreement == 1.0 and parity.max_abs_logit_diff < 1e-3
        assert parity.running_argmax_agreement == 1.0
        assert parity.n == 100  # every validation image
    assert m.parity.exit_stage_agreement == 1.0
    assert m.combine == "sum" and all(s.sources == ["images"] and not s.outputs for s in m.stages)
    # the version folders get the umask's permissions (a server running as another user, e.g. in the
    # container, must read them), not a temporary folder's 0700
    umask = os.umask(0)
    os.umask(umask)
    for folder in (repo / "tiny" / "1", repo / "tiny-teacher" / "1"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, oct(folder.stat().st_mode)


def test_runtime_matches_pytorch(exported, tiny_run, test_set):
    repo, _ = exported
    rt = CascadeRuntime(repo / "tiny" / "1")
    running = torch_running_logits(tiny_run[0], test_set.images)
    full = rt.run(test_set.images, early_exit=False)
    assert np.array_equal(full.class_id, running[-1].argmax(-1))
    assert np.allclose(full.logits, running[-1], atol=1e-4)
    adaptive = rt.run(test_set.images)
    expected_class = running[adaptive.exit_stage, np.arange(len(test_set.labels))].argmax(-1)
    assert np.array_equal(adaptive.class_id, expected_class)


def test_threshold_zero_exits_everything_at_stage_zero_and_no_early_exit_runs_all(exported, test_set):
    rt = CascadeRuntime(exported[0] / "tiny" / "1")
    zero = rt.run(test_set.images, threshold=0.0)
    assert (zero.exit_stage == 0).all()
    assert (zero.flops == rt.stage_flops[0]).all()
    everything = rt.run(test_set.images, early_exit=False)
    assert (everything.exit_stage == 2).all() and (everything.flops == rt.stage_flops.sum()).all()
    never = rt.run(test_set.images, threshold=1.0)
    assert (never.exit_stage == 2).sum() >= len(test_set.labels) - (never.confidence >= 1.0).sum()


def test_max_stage_caps_the_depth_and_flops_are_the_stages_run(exported, test_set):
    rt = CascadeRuntime(exported[0] / "tiny" / "1")
    for cap in (0, 1, 2):
        r = rt.run(test_set.images, max_stage=cap, early_exit=False)
        assert (r.exit_stage == cap).all()
    r = rt.run(test_set.images, threshold=0.3)
    assert len(set(r.exit_stage.tolist())) > 1, "the tiny cascade should exit at more than one stage at 0.3"
    cum = np.cumsum(rt.stage_flops)
    assert np.array_equal(r.flops, cum[r.exit_stage])
    capped = rt.run(test_set.images, threshold=0.3, max_stage=1)
    assert capped.exit_stage.max() <= 1
    with pytest.raises(ValueError, match="max_stage must be between 0 and 2"):
        rt.run(test_set.images, max_stage=3)
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        rt.run(test_set.images, threshold=1.5)
    with pytest.raises(ValueError, match=r"images must be \[N, 1, 12, 12\]"):
        rt.run(np.zeros((2, 3, 12, 12), np.float32))


def test_manifest_metrics_are_what_the_runtime_measures(exported, test_set):
    repo, _ = exported
    m = json.loads((repo / "tiny" / "1" / "manifest.json").read_text())
    rt = CascadeRuntime(repo / "tiny" / "1")
    r = rt.run(test_set.images)
    assert m["metrics"]["adaptive_accuracy"] == pytest.approx((r.class_id == test_set.labels).mean(), abs=1e-12)
    assert m["metrics"]["mean_flops"] == pytest.approx(r.flops.mean())
    assert sum(m["metrics"]["exit_counts"]) == len(test_set.labels)


def _copy_version(exported, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    return repo, repo / "tiny" / "1"


def test_tampered_file_is_refused(exported, tmp_path):
    repo, v = _copy_version(exported, tmp_path)
    stage = v / "stage1-res1.onnx"
    data = bytearray(stage.read_bytes())
    data[-10] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"stages\.1\.sha256: stage1-res1\.onnx has sha256 .* re-export"):
        CascadeRuntime(v)


def test_missing_stage_file_is_refused(exported, tmp_path):
    repo, v = _copy_version(exported, tmp_path)
    (v / "stage2-res2.onnx").unlink()
    with pytest.raises(ManifestError, match=r"stages\.2\.file: stage2-res2\.onnx is missing"):
        ModelRepository(repo).load("tiny")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("labels"), r"labels: Field required"),
    (lambda m: m["input"].update(color="RGB"), r"input: color 'RGB' does not match channels 1"),
    (lambda m: m["stages"][0].update(flops=-3), r"stages\.0\.flops: Input should be greater than 0"),
    (lambda m: m["exit"].update(thresholds=[0.5]), r"exit\.thresholds needs 2 values"),
    (lambda m: m["exit"].update(measure="top1"), r"exit\.measure: Input should be"),
    (lambda m: m.update(version=4), r"version: 4 does not match its folder '1'"),
])
def test_wrong_or_missing_manifest_fields_are_named(exported, tmp_path, edit, message):
    repo, v = _copy_version(exported, tmp_path)
    manifest = json.loads((v / "manifest.json").read_text())
    edit(manifest)
    (v / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message):
        CascadeRuntime(v)


def test_existing_versions_are_never_overwritten_and_the_highest_is_served(exported, tiny_run, tmp_path):
    repo, v = _copy_version(exported, tmp_path)
    before = {p.name: sha256_file(p) for p in v.iterdir()}
    with pytest.raises(ExportError, match="already exists"):
        export_run(tiny_run[0], repo, "tiny", 1, log=lambda m: None)
    assert {p.name: sha256_file(p) for p in v.iterdir()} == before
    out = export_run(tiny_run[0], repo, "tiny", log=lambda m: None)
    assert out["cascade"].endswith("tiny/2") and out["teacher"].endswith("tiny-teacher/2")
    path, manifest = ModelRepository(repo).load("tiny")
    assert path.name == "2" and manifest.version == 2
    assert ModelRepository(repo).load("tiny", 1)[1].version == 1


def test_failed_parity_fails_loudly_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    real_export = exporter.export_onnx

    def wrong_model(model, path, shape, precision="fp32", **names):  # another stage's network in place of res1
        if "res1" in path.name:
            model = load_stage(tiny_run[0], "student")[0]
        return real_export(model, path, shape, precision, **names)

    monkeypatch.setattr(exporter, "export_onnx", wrong_model)
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="parity failed for stage res1"):
        export_run(tiny_run[0], repo, "tiny", log=lambda m: None)
    assert ModelRepository(repo).models() == []
    assert not [p for p in repo.rglob("*") if p.is_file()]


def test_calibrate_command_with_a_flops_budget(exported, tmp_path):
    from reskd.cli import main

    repo, v = _copy_version(exported, tmp_path)
    manifest = load_manifest(v)
    budget_pct = 100 * manifest.stages[0].flops * 1.3 / manifest.teacher.flops
    assert main(["calibrate", "--repo", str(repo), "--model", "tiny:1", "--flops-budget", f"{budget_pct}"]) == 0
    after = load_manifest(v)
    assert after.calibration.mean_flops <= budget_pct / 100 * manifest.teacher.flops + 1e-6
    assert after.calibration.flops_budget_pct_teacher == pytest.approx(budget_pct)
    assert main(["calibrate", "--repo", str(repo), "--model", "tiny-teacher"]) == 2
    assert main(["calibrate", "--repo", str(repo), "--model", "nope"]) == 2


def test_eval_sets_refuse_a_changed_split(exported):
    repo, _ = exported
    m = load_manifest(repo / "tiny" / "1")
    with pytest.raises(ExportError, match="validation split loaded now differs"):
        eval_sets(m.source.data, InputSpec(**m.input.model_dump()), expected_val_ids=[0, 1, 2])


def test_export_command_errors_say_what_to_fix(tiny_run, tmp_path, capsys):
    from reskd.cli import main

    assert main(["export", "--run", str(tmp_path / "nope"), "--repo", str(tmp_path / "r"), "--name", "x"]) == 2
    assert "RUN_DIR must be a directory written by `reskd train`" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run[0], unfinished)
    (unfinished / "checkpoints" / "res2.pt").unlink()
    assert main(["export", "--run", str(unfinished), "--repo", str(tmp_path / "r"), "--name", "x"]) == 2
    assert "res2.pt is missing: is the run finished?" in capsys.readouterr().err
    assert not (tmp_path / "r" / "x").exists()
    base = ["export", "--run", str(tiny_run[0]), "--repo", str(tmp_path / "r"), "--name", "x"]
    assert main([*base, "--stages", "student,nope"]) == 2
    assert "the run has no model 'nope' to export (checkpoints: " in capsys.readouterr().err
    assert main([*base, "--stages", "student,res1,student"]) == 2
    assert "--stages names a network twice: student, res1, student" in capsys.readouterr().err
    assert main([*base, "--model", "res1", "--combine", "replace"]) == 2
    assert "--model exports one network: it takes neither --stages, --combine nor --fallback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--combine", "average"])
    assert "invalid choice: 'average'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "x").exists()
    with pytest.raises(SystemExit):
        main(["calibrate", "--repo", "r", "--model", "m", "--target-drop", "0.1", "--flops-budget", "10"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--repo", "r", "--model", "m", "--flops-budget", "-5"])
    assert "must be a number >= 0" in capsys.readouterr().err


def test_one_network_of_a_run_exports_as_a_one_stage_model(tiny_run, exported, tmp_path):
    from reskd.export.command import export_run
    from reskd.export.errors import ExportError

    run_dir = tiny_run[0]
    kd = sorted(p.stem for p in (run_dir / "checkpoints").glob("kd-*.pt"))[0]
    out = export_run(run_dir, tmp_path, "tiny-kd", model=kd, log=lambda msg: None)
    manifest = out["model_manifest"]
    assert [s.name for s in manifest.stages] == [kd] and manifest.exit.thresholds == []
    cascade = exported[1]["cascade_manifest"]
    # measured against the same teacher; no teacher version is written beside it, so none is named
    assert (manifest.teacher.flops, manifest.teacher.accuracy) == (cascade.teacher.flops, cascade.teacher.accuracy)
    assert manifest.teacher.model is None and cascade.teacher.model == "tiny-teacher:1"
    assert manifest.parity.stages[kd].argmax_agreement == 1.0
    rt = CascadeRuntime(tmp_path / "tiny-kd" / "1")
    assert rt.num_stages == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-kd"]  # no teacher version written
    with pytest.raises(ExportError, match="no model 'kd-nope'.*checkpoints: .*student"):
        export_run(run_dir, tmp_path, "x", model="kd-nope", log=lambda msg: None)


def test_fp16_export_keeps_float32_io_records_parity_and_calibrates_on_fp16(tiny_run, exported, test_set, tmp_path):
    import onnx

    repo = tmp_path / "repo"
    export_run(tiny_run[0], repo, "tiny", precision="fp16", log=lambda msg: None)
    fp32_dir, fp16_dir = exported[0] / "tiny" / "1", repo / "tiny" / "1"
    for folder in (fp16_dir, repo / "tiny-teacher" / "1"):
        m = load_manifest(folder)
        assert m.precision == "fp16"
        graph = onnx.load(folder / m.stages[0].file).graph
        assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.FLOAT}  # images float32
        assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}  # logits float32
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in graph.initializer}  # weights in half precision
    assert "precision" not in json.loads((fp32_dir / "manifest.json").read_text())  # fp32 manifests unchanged
    m = load_manifest(fp16_dir)
    for parity in m.parity.stages.values():  # measured against the fp32 PyTorch network: rounding shows
        assert 0 < parity.max_abs_logit_diff < 0.05
        assert parity.running_argmax_agreement >= MIN_AGREEMENT["fp16"]
    assert m.parity.exit_stage_agreement >= MIN_AGREEMENT["fp16"]
    assert m.calibration is not None  # thresholds chosen on the fp16 graph itself
    half, full = CascadeRuntime(fp16_dir), CascadeRuntime(fp32_dir)
    a, b = half.run(test_set.images, early_exit=False), full.run(test_set.images, early_exit=False)
    assert 0 < np.abs(a.logits - b.logits).max() < 0.05
    assert (a.class_id == b.class_id).mean() >= 0.98
    with pytest.raises(ExportError, match="precision must be one of fp32, fp16"):
        export_run(tiny_run[0], repo, "tiny", precision="bf16", log=lambda msg: None)
