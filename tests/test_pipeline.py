"""The training pipeline end to end on a tiny generated dataset, observed from the outside and through spies
on the real functions (they record and pass through; nothing is replaced)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import load_stage, tiny_recipe_dict
from reskd.training import loop, pipeline
from reskd.training.batches import Normalizer, batches
from reskd.training.data import load_dataset
from reskd.training.pipeline import RunDirError, Trainer, train
from reskd.training.recipe import parse_recipe


def test_every_stage_trains_and_its_loss_falls(tiny_run):
    run_dir, _, report, spies = tiny_run
    trained = [name for name, _ in spies.fit_calls]
    assert trained == ["teacher", "student", "res1", "res2", "kd-resnet8x0.375"]
    for name in trained:
        losses = [h["loss"] for h in report["models"][name]["history"]]
        assert len(losses) >= 2 and losses[-1] < losses[0], f"{name} loss did not fall: {losses}"
    for name in ("teacher", "student", "res1", "res2"):
        assert (run_dir / "checkpoints" / f"{name}.pt").is_file()


def test_res_student_targets_are_the_centred_teacher_cascade_residual(tiny_run):
    run_dir, _, _, spies = tiny_run
    teacher, _ = load_stage(run_dir, "teacher")
    student, _ = load_stage(run_dir, "student")
    res1, _ = load_stage(run_dir, "res1")
    seen = {c["res"] for c in spies.residual_calls}
    assert seen == {1, 2}
    with torch.no_grad():
        for call in spies.residual_calls:
            x = call["x"]
            # the teacher's target was computed on this very (augmented) batch, in eval mode
            assert torch.allclose(call["teacher"], teacher(x), atol=1e-4)
            expected_cascade = student(x) if call["res"] == 1 else student(x) + res1(x)
            assert torch.allclose(call["cascade"], expected_cascade, atol=1e-4)
            target = pipeline.residual_target(call["teacher"], call["cascade"])
            gap = teacher(x) - expected_cascade
            assert torch.allclose(target, gap - gap.mean(-1, keepdim=True), atol=1e-4)


def test_frozen_stages_keep_weights_and_batchnorm_buffers(tiny_idx, tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(tiny_idx, baselines={}))
    trainer = Trainer(recipe, tmp_path, device="cpu")
    data = load_dataset(recipe.data)
    norm = Normalizer(data.mean, data.std, trainer.device)
    teacher = trainer.teacher(data, norm)
    student = trainer.kd_model("student", "student", recipe.student.spec, recipe.student.resolve(recipe.train),
                               recipe.student.kd_alpha, recipe.student.kd_temperature,
                               trainer.fingerprints()["student"], teacher, data, norm)
    before = {name: {k: v.clone() for k, v in s.model.state_dict().items()} for name, s in
              (("teacher", teacher), ("student", student))}
    res1 = trainer.res_student(0, recipe.res_students[0], teacher, [student], data, norm)
    assert res1.history and res1.trained_now
    for name, stage in (("teacher", teacher), ("student", student)):
        after = stage.model.state_dict()
        assert any("running_mean" in k for k in after)
        for key, value in before[name].items():
            assert torch.equal(after[key], value), f"{name}.{key} moved while res1 trained"
        assert not stage.model.training


def test_cascade_logits_are_the_sum_of_stage_logits(tiny_run):
    run_dir, _, report, _ = tiny_run
    saved = np.load(run_dir / "logits.npz")
    data = json.loads((run_dir / "run.json").read_text())["data"]
    recipe = parse_recipe(json.loads((run_dir / "run.json").read_text())["recipe"])
    bundle = load_dataset(recipe.data)
    norm = Normalizer(data["mean"], data["std"], torch.device("cpu"))
    x = torch.cat([xb for xb, _ in batches(bundle.test, 128, normalizer=norm, device=torch.device("cpu"))])
    stages = [load_stage(run_dir, n)[0] for n in ("student", "res1", "res2")]
    with torch.no_grad():
        stage_logits = [m(x) for m in stages]
    running = torch.zeros_like(stage_logits[0])
    for k, (name, logits) in enumerate(zip(("student", "res1", "res2"), stage_logits)):
        assert np.allclose(saved[f"test/{name}"], logits.numpy(), atol=1e-4)
        running = running + logits
        accuracy = (running.argmax(-1).numpy() == saved["test/labels"]).mean() * 100
        assert report["cascade"]["depths"][k]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert report["cascade"]["stage_flops"] == [report["models"][n]["flops"] for n in ("student", "res1", "res2")]


def test_validation_images_are_never_trained_on(tiny_run):
    run_dir, _, _, spies = tiny_run
    val_ids = set(json.loads((run_dir / "run.json").read_text())["data"]["val_ids"])
    assert len(val_ids) == 100
    for name, ids in spies.fit_calls:
        assert len(ids) == 600, name
        assert not val_ids & set(ids.tolist()), f"{name} trained on validation images"


def test_report_files_and_figures(tiny_run):
    run_dir, recipe, report, _ = tiny_run
    for name in ("report.json", "report.md", "pareto.png", "logits.npz", "run.json"):
        assert (run_dir / name).stat().st_size > 0
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["adaptive"] == report["adaptive"]
    a = report["adaptive"]
    assert len(a["thresholds"]) == 2 and sum(a["test"]["exit_counts"]) == 200
    lo, hi = a["test"]["ci95"]
    assert lo <= a["test"]["accuracy"] <= hi
    full_flops = sum(report["cascade"]["stage_flops"])
    assert report["cascade"]["stage_flops"][0] <= a["test"]["mean_flops"] <= full_flops
    assert [g["tag"] for g in report["kd_grid"]] == ["resnet8x0.25", "resnet8x0.375"]
    assert report["independent_cascade"]["models"] == ["student", "kd-resnet8x0.375"]
    md = (run_dir / "report.md").read_text()
    assert "2 x multiply-accumulates" in md and "| adaptive - teacher |" in md
    assert report["models"]["teacher"]["pct_teacher_flops"] == 100.0


def test_the_report_measures_each_cascade_with_the_teacher_as_its_fallback(tiny_run):
    """The fallback section, recomputed here from logits.npz: the ResKD cascade's summed logits, then the teacher's
    in their place; a sample leaves at the first stage whose max probability reaches its threshold."""
    run_dir, _, report, _ = tiny_run
    fb = report["fallback"]
    assert list(fb["cascades"]) == ["ResKD + teacher", "student + teacher", "independent + teacher"]
    reskd = fb["cascades"]["ResKD + teacher"]
    assert reskd["stages"] == ["student", "res1", "res2", "teacher"]
    assert reskd["combine"] == ["sum", "sum", "sum", "replace"]
    assert fb["cascades"]["independent + teacher"]["stages"] == ["student", "kd-resnet8x0.375", "teacher"]
    logits = np.load(run_dir / "logits.npz")
    labels = logits["test/labels"]
    summed = np.cumsum([logits[f"test/{n}"].astype(np.float64) for n in ("student", "res1", "res2")], axis=0)
    running = [*summed, logits["test/teacher"].astype(np.float64)]
    flops = np.cumsum([report["models"][n]["flops"] for n in reskd["stages"]])
    for key, point in reskd["points"].items():
        exits = np.full(len(labels), 3)
        for i in range(len(labels)):
            for s, t in enumerate(point["thresholds"]):
                p = np.exp(running[s][i] - running[s][i].max())
                if p.max() / p.sum() >= t:
                    exits[i] = s
                    break
        answer = np.array([running[e][i].argmax() for i, e in enumerate(exits)])
        assert point["test"]["accuracy"] == pytest.approx(100 * (answer == labels).mean(), abs=1e-3), key
        assert point["test"]["mean_flops"] == pytest.approx(flops[exits].mean()), key
        assert point["test"]["full_cascade_accuracy"] == report["models"]["teacher"]["test_accuracy"]
    assert list(reskd["points"]) == ["calibrated", *(f"{p}%" for p in fb["budgets_pct"])]
    assert [d["what"].split(",")[0] for d in fb["differences"]][-1].startswith("ResKD + teacher (calibrated)")
    assert len(fb["differences"]) == len(fb["budgets_pct"]) + 1
    assert "## With the teacher as a fallback stage" in (run_dir / "report.md").read_text()


def test_resume_skips_finished_stages(tiny_run, tmp_path, monkeypatch):
    run_dir, recipe, report, _ = tiny_run
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run_dir, copy)
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        Trainer(recipe, copy, device="cpu")
    trained = []
    real_fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: trained.append(kw["desc"]) or real_fit(*a, **kw))
    again = train(recipe, copy, resume=True, device="cpu")
    assert trained == []
    assert again["models"]["res2"]["test_accuracy"] == report["models"]["res2"]["test_accuracy"]
    assert again["adaptive"]["thresholds"] == report["adaptive"]["thresholds"]
    # Remove the last res-student: only it is trained again.
    (copy / "checkpoints" / "res2.pt").unlink()
    train(recipe, copy, resume=True, device="cpu")
    assert trained == ["res2"]


def test_resume_refuses_a_changed_stage(tiny_run, tmp_path):
    run_dir, _, _, _ = tiny_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    changed = tiny_recipe_dict(json.loads((run_dir / "run.json").read_text())["recipe"]["data"]["root"])
    changed["student"] = {**changed["student"], "kd_temperature": 2.0}
    with pytest.raises(RunDirError, match="student.pt was trained with other settings"):
        train(parse_recipe(changed), copy, resume=True, device="cpu")


def test_teacher_from_a_checkpoint(tiny_run, tiny_idx, tmp_path):
    run_dir, _, report, _ = tiny_run
    recipe = tiny_recipe_dict(tiny_idx, baselines={})
    recipe["teacher"] = {**recipe["teacher"], "checkpoint": str(run_dir / "checkpoints" / "teacher.pt")}
    recipe["res_students"] = []
    out = train(parse_recipe(recipe), tmp_path / "run", device="cpu")
    assert out["models"]["teacher"]["test_accuracy"] == report["models"]["teacher"]["test_accuracy"]
    assert out["models"]["teacher"]["history"] == []
    wrong = tiny_recipe_dict(tiny_idx, baselines={})
    wrong["teacher"] = {"arch": "resnet14", "checkpoint": str(run_dir / "checkpoints" / "teacher.pt")}
    with pytest.raises(ValueError, match="does not fit the recipe's teacher arch"):
        train(parse_recipe(wrong), tmp_path / "run2", device="cpu")


def test_res_students_that_read_the_students_features(tiny_run, tiny_idx, tmp_path):
    """input = "features": the res-student is a head on the student's last feature map; the running logits are
    student(x) + head(student.features(x)); its FLOPs are the head's alone; reach weighting and a stage seed
    train it; export writes the student with a `features` output and the head reading it, and the runtime gives
    what PyTorch gives."""
    from reskd.export.command import export_run
    from reskd.export.errors import ExportError
    from reskd.runtime import CascadeRuntime
    from reskd.training.flops import count_flops

    run_dir = tiny_run[0]
    recipe = tiny_recipe_dict(tiny_idx, baselines={})
    recipe["res_students"] = [{"arch": "head1", "width": 0.25, "input": "features", "mse_weight": 0.0,
                               "ce_weight": 1.0, "kd_weight": 1.0, "sample_weighting": "reach", "seed": 3}]
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("teacher", "student"):  # the same teacher and student: only the head trains
        shutil.copy(run_dir / "checkpoints" / f"{name}.pt", out / "checkpoints" / f"{name}.pt")
    report = train(parse_recipe(recipe), out, resume=True, device="cpu")
    student, _ = load_stage(out, "student")
    head, ckpt = load_stage(out, "res1")
    assert ckpt.extra["reads"] == "student.features" and ckpt.in_channels == 16  # resnet8x0.25's last map
    images = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        features = student.features(images)
        assert features.shape[1:] == (16, 3, 3)
        assert report["models"]["res1"]["flops"] == count_flops(head, tuple(features.shape[1:]))
        assert report["models"]["res1"]["flops"] < count_flops(student, (1, 12, 12))
    saved = np.load(out / "logits.npz")
    data = load_dataset(parse_recipe(recipe).data)
    x = Normalizer(data.mean, data.std, torch.device("cpu"))(data.test.images[:20])
    with torch.no_grad():
        want = head(student.features(x)).numpy()
    np.testing.assert_allclose(saved["test/res1"][:20], want, atol=1e-4)
    losses = [h["loss"] for h in report["models"]["res1"]["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    result = export_run(out, tmp_path / "repo", "x", log=lambda m: None)
    manifest = result["cascade_manifest"]
    student_spec, head_spec = manifest.stages
    assert [(o.name, o.shape) for o in student_spec.outputs] == [("features", [16, 3, 3])]
    assert [(i.name, i.source) for i in head_spec.inputs] == [("features", "student.features")]
    assert head_spec.flops == report["models"]["res1"]["flops"] and manifest.combine == "sum"
    assert manifest.parity.stages["student"].max_abs_output_diff["features"] < 1e-3
    rt = CascadeRuntime(result["cascade"])
    with torch.no_grad():
        want = (student(x) + head(student.features(x))).numpy()
    np.testing.assert_allclose(rt.all_stage_logits(x.numpy())[1], want, atol=1e-4)
    with pytest.raises(ExportError, match="res1 must be an earlier stage|student must be an earlier stage"):
        export_run(out, tmp_path / "repo", "y", stages=["res1", "student"], log=lambda m: None)
    with pytest.raises(ExportError, match="res1 reads student.features"):
        export_run(out, tmp_path / "repo", "z", model="res1", log=lambda m: None)


def test_cpu_precision_settings_change_the_fingerprint_only_when_set(tiny_idx, tmp_path):
    """train.autocast and train.channels_last came after runs existed: left at their defaults they leave every
    fingerprint as it was (earlier runs stay resumable); set, they change every stage's (the weights differ)."""
    base = tiny_recipe_dict(tiny_idx)
    fingerprints = {}
    for label, extra in {"absent": {}, "defaults": {"autocast": "auto"}, "bf16": {"autocast": "bf16"},
                         "channels_last": {"channels_last": True}}.items():
        recipe = parse_recipe({**base, "train": {**base["train"], **extra}})
        fingerprints[label] = Trainer(recipe, tmp_path / label, device="cpu").fingerprints()
    assert fingerprints["defaults"] == fingerprints["absent"]
    for label in ("bf16", "channels_last"):
        assert all(fingerprints[label][k] != v for k, v in fingerprints["absent"].items()), label


@pytest.mark.parametrize("autocast, channels_last", [("auto", None), ("bf16", True), ("fp32", False)])
def test_training_steps_run_in_the_precision_and_memory_format_the_recipe_asks(autocast, channels_last):
    """On the CPU: bf16 autocast only when the recipe says bf16 ("auto" is fp32 here), channels_last batches and
    weights only when it says so; what the step computes trains the model either way."""
    from reskd.training.data import TensorSplit
    from reskd.training.recipe import TrainConfig

    torch.manual_seed(0)
    # three channels: a one-channel batch is channels_last and contiguous at once, which would prove nothing
    split = TensorSplit(torch.randint(0, 256, (100, 3, 12, 12), dtype=torch.uint8), torch.randint(0, 10, (100,)),
                        np.arange(100))
    cfg = TrainConfig(epochs=2, batch_size=50, lr=0.05, autocast=autocast, channels_last=channels_last)
    device = torch.device("cpu")
    model = loop.prepare(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                             torch.nn.Linear(400, 10)), device, loop.uses_channels_last(device, cfg))
    seen = []

    def step(x, y):
        logits = model(x)
        seen.append((torch.is_autocast_enabled("cpu"), x.is_contiguous(memory_format=torch.channels_last),
                     logits.dtype))
        return torch.nn.functional.cross_entropy(logits.float(), y), logits

    loop.fit(model, step, split, cfg, normalizer=Normalizer([0.5] * 3, [0.25] * 3, device), device=device, seed=0,
             desc="t")
    bf16 = autocast == "bf16"
    assert seen == [(bf16, bool(channels_last), torch.bfloat16 if bf16 else torch.float32)] * 4
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) == bool(channels_last)
