"""Stage inputs and cascade kinds, on the bundled versions that use them: fashion-mnist/2 (a ResKD cascade whose
res-student reads the student's feature map, `combine: sum`), fashion-mnist-independent/1 (independent models,
`combine: replace`) and fashion-mnist-fallback/1 (the first one's two stages summed, then the teacher as a stage
whose own `combine: replace` sets the running logits to its logits). Old manifests load unchanged; what a manifest declares is checked against its graphs; the
runtime, both engines and every scheduler policy give the same answers for per-request thresholds and max_stage,
and those answers are what the graphs' outputs combine to."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reskd.device import Device
from reskd.engine import EngineSpec, images_part
from reskd.manifest import ManifestError, load_manifest, write_manifest
from reskd.runtime import CascadeRuntime
from reskd.service.serving.scheduler import CascadeScheduler
from conftest import session_reference
from server_process import BUNDLED

FEATURES = BUNDLED / "fashion-mnist" / "2"
INDEPENDENT = BUNDLED / "fashion-mnist-independent" / "1"
FALLBACK = BUNDLED / "fashion-mnist-fallback" / "1"
BUCKETS = (1, 4, 16, 64)
KINDS = {"features-sum": FEATURES, "independent-replace": INDEPENDENT, "sum-then-replace": FALLBACK}


@pytest.fixture(scope="module", params=list(KINDS))
def version(request):
    return KINDS[request.param]


def runtime(path, engine="host"):
    spec = EngineSpec("bound", buckets=BUCKETS, max_blocks=3) if engine == "bound" else None
    rt = CascadeRuntime(path, device=Device.cpu(), engine=spec)
    rt.engine.warm_up()
    return rt


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 1, 28, 28)).astype(np.float32)


def test_the_bundled_versions_declare_what_they_do():
    features = load_manifest(FEATURES)
    assert features.combine == "sum" and [s.name for s in features.stages] == ["student", "res1"]
    assert [(o.name, o.shape) for o in features.stages[0].outputs] == [("features", [32, 7, 7])]
    assert [(i.name, i.source) for i in features.stages[1].inputs] == [("features", "student.features")]
    # the head's FLOPs are its own: less than the student it reads from would cost again plus itself
    independent = load_manifest(INDEPENDENT)
    assert independent.combine == "replace" and len(independent.stages) == 3
    assert all([(i.name, i.source) for i in s.inputs] == [("images", "images")] for s in independent.stages)
    assert independent.teacher.flops == features.teacher.flops == load_manifest(
        BUNDLED / "fashion-mnist-teacher" / "2").stages[0].flops


def test_an_old_manifest_loads_unchanged_and_is_written_back_without_new_fields(tmp_path):
    old = BUNDLED / "fashion-mnist" / "1"
    manifest = load_manifest(old)
    assert manifest.combine == "sum" and manifest.precision == "fp32"
    assert all(s.sources == ["images"] and s.outputs == [] for s in manifest.stages)
    raw = json.loads((old / "manifest.json").read_text())
    assert "combine" not in raw and all("inputs" not in s and "outputs" not in s for s in raw["stages"])
    shutil.copytree(old, tmp_path / "1")
    write_manifest(tmp_path / "1", load_manifest(tmp_path / "1"))
    assert json.loads((tmp_path / "1" / "manifest.json").read_text()) == raw


def _edited(tmp_path, source, edit):
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    edit(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stages"][1]["inputs"][0].update(source="res1.features"),
     r"stages.1.inputs.0.source: 'res1.features' is not an output of an earlier stage \(declared: student.features"),
    (lambda m: m["stages"][1]["inputs"][0].update(source="teacher"), r"stages.1.inputs.0.source"),
    (lambda m: m["stages"][0].pop("outputs"), r"'student.features' is not an output of an earlier stage"),
    (lambda m: m["stages"][0]["outputs"].append({"name": "logits", "shape": [10]}), r"not 'logits'"),
    (lambda m: m.update(combine="average"), r"combine"),
    (lambda m: m["stages"][1].update(combine="average"), r"stages\.1\.combine: Input should be 'sum' or 'replace'"),
])
def test_a_manifest_that_declares_impossible_inputs_is_refused_naming_the_field(tmp_path, edit, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_edited(tmp_path, FEATURES, edit), check_folder_name=False)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stages"][1]["inputs"][0].update(name="feats"),
     r"stages.1 \(stage1-res1.onnx\): the graph's inputs are \['features'\], the manifest declares \['feats'\]"),
    (lambda m: m["stages"][0]["outputs"][0].update(shape=[16, 7, 7]),
     r"stages.0 \(stage0-student.onnx\): features is \[32, 7, 7\] per sample in the graph, the manifest says "
     r"\[16, 7, 7\]"),
    (lambda m: m["stages"][1].update(outputs=[{"name": "attention", "shape": [4]}]),
     r"stages.1 \(stage1-res1.onnx\): the graph has no output attention"),
])
def test_a_manifest_that_does_not_match_its_graphs_is_refused_when_opened(tmp_path, edit, message):
    folder = _edited(tmp_path, FEATURES, edit)
    with pytest.raises(ManifestError, match=message):
        CascadeRuntime(folder, device=Device.cpu(), check_folder_name=False)


SETTINGS = [(None, None), (1.0, None), (0.0, None), (0.9, 1), (None, 0), (0.6, None), (1.0, 0)]


@pytest.mark.parametrize("engine", ["host", "bound"])
def test_the_runtime_combines_each_kind_as_its_manifest_says(version, engine):
    rt = runtime(version, engine)
    x = images(40, seed=1)
    for threshold, max_stage in SETTINGS:
        got = rt.run(x, threshold=threshold, max_stage=max_stage)
        logits, exits = session_reference(rt, x, threshold, max_stage)
        np.testing.assert_array_equal(got.exit_stage, exits)
        np.testing.assert_allclose(got.logits, logits, atol=1e-4)
        np.testing.assert_array_equal(got.flops, rt.cum_flops[exits])
    every = rt.run(x, threshold=1.0)
    assert (every.exit_stage == rt.num_stages - 1).all()


def test_the_bound_engine_carries_the_feature_map_in_fixed_buffers_and_prepares_nothing_after_warm_up():
    rt = runtime(FEATURES, "bound")
    before = rt.engine.stats()
    assert "carried:student.features" in before.buffers and "gathered:student.features" in before.buffers
    assert "gathered:images" in before.buffers  # stage 0 of merged requests
    x = images(150, seed=2)
    settings = np.random.default_rng(2).choice([None, 0.0, 0.7, 0.9, 1.0], size=150).tolist()
    got = rt.run(x, threshold=settings)
    want = runtime(FEATURES).run(x, threshold=settings)
    np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    assert 0 < (got.exit_stage == 1).sum() < 150  # survivors' features were gathered, not whole batches only
    after = rt.engine.stats()
    assert after.buffers == before.buffers and set(after.calls) == set(before.calls)


def test_survivors_keep_only_what_a_later_stage_reads(version):
    rt = runtime(version, "bound")
    x = images(16, seed=3)
    block = rt.engine.upload(x)
    run = rt.engine.run(0, [images_part(block, np.arange(16))], keep=True)
    keep = np.zeros(16, bool)
    keep[[2, 5, 11]] = True
    after = rt.survivors(0, images_part(block, np.arange(16)), run.carried, keep)
    if version in (FEATURES, FALLBACK):  # the head reads the student's features: they are carried
        # the images only while a later stage still reads them (the fallback teacher does, the head does not)
        assert set(after) == ({"student.features", "images"} if version == FALLBACK else {"student.features"})
        features, rows = after["student.features"]
        assert features.value is not None and features.rows == 16  # a block of its own (kept past this call)
        np.testing.assert_array_equal(rows, [2, 5, 11])
        head = rt.engine.run(1, [after]).logits
        np.testing.assert_allclose(head, rt.graph_outputs(x[[2, 5, 11]])[1]["logits"], atol=1e-5)
        if version == FALLBACK:  # after the head, only the images go on to the teacher
            assert set(rt.survivors(1, after, {}, np.ones(3, bool))) == {"images"}
    else:
        assert set(after) == {"images"} and run.carried == {}
    assert rt.survivors(rt.num_stages - 1, after, {}, np.ones(3, bool)) == {}  # nothing read after the last


async def serve_all(sched, reqs):
    sched.start()
    try:
        futures = []
        for x, threshold, max_stage in reqs:
            futures.append(sched.submit(x, threshold, max_stage))
            await asyncio.sleep(0.001)
        return await asyncio.gather(*futures)
    finally:
        await sched.stop()


@pytest.mark.parametrize("policy", ["stage", "request", "none"])
@pytest.mark.parametrize("engine", ["host", "bound"])
def test_per_request_settings_act_alike_for_both_kinds_under_every_scheduler(version, policy, engine):
    rt = runtime(version, engine)
    rng = np.random.default_rng(4)
    reqs = [(images(int(rng.integers(1, 7)), seed=10 + i), *SETTINGS[i % len(SETTINGS)]) for i in range(21)]
    sched = CascadeScheduler(rt, rt.engine, ThreadPoolExecutor(2), model="m", version=1, policy=policy,
                             max_batch_sizes=[16, 8, 8], max_queue_delays_s=[0.002, 0.005, 0.005],
                             max_queue_images=1024, pipeline_depth=2)
    results = asyncio.run(serve_all(sched, reqs))
    exits = set()
    for (x, threshold, max_stage), got in zip(reqs, results):
        want = rt.run(x, threshold=threshold, max_stage=max_stage)
        np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
        np.testing.assert_array_equal(got.class_id, want.class_id)
        np.testing.assert_array_equal(got.flops, want.flops)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
        exits |= set(got.exit_stage.tolist())
    assert exits == set(range(rt.num_stages))
