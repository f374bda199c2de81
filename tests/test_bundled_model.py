"""The bundled model repository (models/): small enough for git, loadable, and as accurate on the real
Fashion-MNIST test set as its manifest claims."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import real_fashion_mnist_or_fail
from reskd.export.runs import eval_sets
from reskd.manifest import ModelRepository, parse_model_ref
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from reskd.training.data import load_fashion_mnist
from server_process import ServerProcess

MODELS = Path(__file__).resolve().parents[1] / "models"
VERSIONS = [(name, v) for name in ModelRepository(MODELS).models() for v in ModelRepository(MODELS).versions(name)]


def test_bundled_repository_is_small_and_loads():
    size = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert size <= 16 * 1024 * 1024, f"models/ is {size / 2**20:.1f} MiB, over the 16 MiB budget"
    repo = ModelRepository(MODELS)
    assert {"fashion-mnist", "fashion-mnist-teacher", "fashion-mnist-independent"} <= set(repo.models())
    versions = repo.versions("fashion-mnist")
    assert versions == repo.versions("fashion-mnist-teacher") and versions[:2] == [1, 2]  # earlier versions stay
    for v in versions:
        _, cascade = repo.load("fashion-mnist", v)
        _, teacher = repo.load("fashion-mnist-teacher", v)
        assert len(cascade.stages) >= 2 and len(teacher.stages) == 1
        assert cascade.teacher.flops == teacher.stages[0].flops
        assert cascade.teacher.accuracy == teacher.metrics.adaptive_accuracy
        assert cascade.teacher.model in (None, f"fashion-mnist-teacher:{v}")
        assert (cascade.input.channels, cascade.input.height, cascade.input.width) == (1, 28, 28)
        if cascade.stage_combine[-1] == "replace":  # a teacher fallback: the same network as its teacher version
            assert cascade.stages[-1].sha256 == teacher.stages[0].sha256
    assert repo.load("fashion-mnist", 2)[1].stages[1].sources == ["student.features"]
    for v in repo.versions("fashion-mnist-independent"):
        _, independent = repo.load("fashion-mnist-independent", v)
        assert independent.combine == "replace"
        if independent.teacher.model is not None:  # its fallback stage is the teacher version it names
            _, teacher = repo.load(*parse_model_ref(independent.teacher.model))
            assert independent.stages[-1].sha256 == teacher.stages[0].sha256
    _, fallback = repo.load("fashion-mnist-fallback", 1)  # fashion-mnist/2 with fashion-mnist-teacher/2 after it
    _, features = repo.load("fashion-mnist", 2)
    assert fallback.stages[:2] == features.stages and fallback.stages[2].combine == "replace"
    assert fallback.stages[2].sha256 == repo.load("fashion-mnist-teacher", 2)[1].stages[0].sha256
    assert fallback.teacher.model == "fashion-mnist-teacher:2"


@pytest.fixture(scope="module")
def real_test_set():
    real_fashion_mnist_or_fail()
    path, manifest = ModelRepository(MODELS).load("fashion-mnist")
    return eval_sets(manifest.source.data, manifest.input)[1]


def check_claims(manifest, labels, class_id, exit_stage, flops, every=None):
    """What a version measured on the test set (its manifest's metrics) holds for these answers."""
    m = manifest.metrics
    assert m.n == len(labels) == 10_000
    assert 100 * (class_id == labels).mean() == pytest.approx(100 * m.adaptive_accuracy, abs=0.05)
    if every is not None:
        for s, claimed in enumerate(m.stage_accuracy):
            assert 100 * (every[s].argmax(-1) == labels).mean() == pytest.approx(100 * claimed, abs=0.05)
    assert flops.mean() == pytest.approx(m.mean_flops, rel=1e-3)
    assert np.bincount(exit_stage, minlength=len(manifest.stages)).tolist() == pytest.approx(m.exit_counts, abs=5)


@pytest.fixture(scope="module")
def runtime_answers(real_test_set):
    """Every bundled version's answers on the real test set, through the runtime."""
    out = {}
    for name, version in VERSIONS:
        rt = CascadeRuntime(MODELS / name / str(version))
        out[name, version] = rt, rt.run(real_test_set.images)
    return out


@pytest.mark.real_data
@pytest.mark.parametrize("name, version", VERSIONS)
def test_bundled_metrics_hold_on_the_real_test_set(name, version, real_test_set, runtime_answers):
    rt, result = runtime_answers[name, version]
    # one stage: its logits are the answers already checked (a second pass over the test set would add nothing)
    every = rt.all_stage_logits(real_test_set.images) if len(rt.manifest.stages) > 1 else None
    check_claims(rt.manifest, real_test_set.labels, result.class_id, result.exit_stage, result.flops, every)
    if every is None:
        assert 100 * (result.class_id == real_test_set.labels).mean() == pytest.approx(
            100 * rt.manifest.metrics.stage_accuracy[0], abs=0.05)


@pytest.mark.real_data
@pytest.mark.server
def test_bundled_metrics_hold_through_the_server(real_test_set, runtime_answers):
    """The whole test set, sent to a real server on the bundled repository with a stock Triton client (FP32
    tensors, binary), gives every version's claims, and the same answers as the runtime."""
    import tritonclient.http as triton

    with ServerProcess(repo=MODELS) as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
        for name, version in VERSIONS:
            got = {"class_id": [], "exit_stage": [], "flops": []}
            for i in range(0, 10_000, 250):
                x = triton.InferInput("images", [250, 1, 28, 28], "FP32")
                x.set_data_from_numpy(real_test_set.images[i:i + 250], binary_data=True)
                out = client.infer(name, [x], model_version=str(version),
                                   outputs=[triton.InferRequestedOutput(k, binary_data=True) for k in got])
                for k in got:
                    got[k].append(out.as_numpy(k))
            got = {k: np.concatenate(v) for k, v in got.items()}
            rt, result = runtime_answers[name, version]
            check_claims(rt.manifest, real_test_set.labels, **got)
            np.testing.assert_array_equal(got["class_id"], result.class_id)
            np.testing.assert_array_equal(got["exit_stage"], result.exit_stage)
        # what a client reads about the fallback version: each stage's combine, its teacher, its curve
        manifest = ModelRepository(MODELS).load("fashion-mnist-fallback", 1)[1]
        meta = client.get_model_metadata("fashion-mnist-fallback", "1")
        assert [s["combine"] for s in meta["stages"]] == ["sum", "sum", "replace"] and meta["combine"] == "sum"
        assert meta["teacher_model"] == "fashion-mnist-teacher:2"
        assert meta["operating_points"] == manifest.operating_points.model_dump()
        params = client.get_model_config("fashion-mnist-fallback", "1")["parameters"]
        assert params["stage_combine"]["string_value"] == "sum,sum,replace"
        assert params["default_operating_point"]["string_value"] == "default"
        assert json.loads(params["operating_points"]["string_value"]) == manifest.operating_points.model_dump()
        assert "operating_points" not in client.get_model_config("fashion-mnist", "2")["parameters"]
        # a request may ask for any point of the curve: the server answers as the runtime does at that point
        rt = runtime_answers["fashion-mnist-fallback", 1][0]
        x = triton.InferInput("images", [250, 1, 28, 28], "FP32")
        x.set_data_from_numpy(real_test_set.images[:250], binary_data=True)
        for point in ("depth-1", "budget-20", "depth-3"):
            out = client.infer("fashion-mnist-fallback", [x], model_version="1", parameters={"operating_point": point})
            want = rt.run(real_test_set.images[:250], point=point)
            np.testing.assert_array_equal(out.as_numpy("exit_stage"), want.exit_stage)
            np.testing.assert_array_equal(out.as_numpy("class_id"), want.class_id)
        with pytest.raises(triton.InferenceServerException, match="has no operating point 'fastest'; its points are"):
            client.infer("fashion-mnist-fallback", [x], model_version="1", parameters={"operating_point": "fastest"})


@pytest.mark.real_data
def test_png_files_and_tensors_give_identical_classes(real_test_set):
    """Real test images encoded as PNG files (in memory: 2,000 files on disk only cost their deletion) and decoded
    through reskd.preprocess classify exactly as the normalised tensors straight from the IDX files."""
    arrays, _ = load_fashion_mnist(None, download=False)
    images = arrays["test"][0][:2000, 0]
    path, manifest = ModelRepository(MODELS).load("fashion-mnist")
    rt = CascadeRuntime(path)
    decoded = []
    for img in images:
        f = io.BytesIO()
        Image.fromarray(img).save(f, format="PNG")
        decoded.append(preprocess(f.getvalue(), manifest.input))
    from_png = rt.run(np.stack(decoded))
    from_tensor = rt.run(real_test_set.images[:2000])
    assert np.array_equal(from_png.class_id, from_tensor.class_id)
    assert np.array_equal(from_png.exit_stage, from_tensor.exit_stage)
    # an 8-bit JPEG of the same image is a lossy copy: most classes survive it, and nothing breaks
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="JPEG", quality=95)
    assert preprocess(buf.getvalue(), manifest.input).shape == (1, 28, 28)


@pytest.mark.real_data
def test_calibrating_the_independent_cascade_for_a_budget_gives_the_ablations_curve_point(tmp_path):
    """`reskd calibrate --flops-budget` on the bundled independent-models cascade (combine: replace), through the
    runtime on the real validation split, chooses what the ablation chose from PyTorch's logits for that budget
    (its curve point at 15.9% of the teacher's FLOPs: thresholds 0.7621 / 0.7134, test 92.62% at 16.08%, exits
    8,758 / 518 / 724, docs/ablation.md and bench/reproduce_ablation.py)."""
    from reskd.cli import main

    real_fashion_mnist_or_fail()
    shutil.copytree(MODELS / "fashion-mnist-independent", tmp_path / "fashion-mnist-independent")
    assert main(["calibrate", "--repo", str(tmp_path), "--model", "fashion-mnist-independent:1",
                 "--flops-budget", "16"]) == 0
    manifest = ModelRepository(tmp_path).load("fashion-mnist-independent", 1)[1]
    assert manifest.combine == "replace"
    assert manifest.exit.thresholds == pytest.approx([0.7621, 0.7134], abs=1e-4)
    assert 100 * manifest.metrics.adaptive_accuracy == pytest.approx(92.62, abs=0.005)
    assert manifest.metrics.pct_teacher_flops == pytest.approx(16.08, abs=0.005)
    assert manifest.metrics.exit_counts == [8758, 518, 724]


@pytest.mark.real_data
def test_calibrate_references_only_refuses_what_it_cannot_do(tmp_path, capsys):
    """`reskd calibrate --references-only` keeps the thresholds, so a calibration rule beside it is refused before
    any data is read; an --audit-model that is not a version of the repository is refused naming it. Status 2, the
    manifest untouched."""
    from reskd.cli import main

    real_fashion_mnist_or_fail()
    shutil.copytree(MODELS / "fashion-mnist-fallback", tmp_path / "fashion-mnist-fallback")
    manifest = tmp_path / "fashion-mnist-fallback" / "1" / "manifest.json"
    before = manifest.read_bytes()
    ref = ["calibrate", "--repo", str(tmp_path), "--model", "fashion-mnist-fallback:1", "--references-only"]
    assert main([*ref, "--target-drop", "0.2"]) == 2
    assert "--references-only keeps the thresholds" in capsys.readouterr().err
    for bad in ("no-such-teacher:1", "fashion-mnist-teacher"):
        assert main([*ref, "--audit-model", bad]) == 2
        assert f"the audit reference {bad} is not a version of the repository" in capsys.readouterr().err
    assert manifest.read_bytes() == before
