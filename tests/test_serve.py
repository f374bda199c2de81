"""`reskd serve` as users meet it: a real uvicorn process on loopback serving the bundled models, real PNG and JPEG
files of the Fashion-MNIST test set, plain HTTP (httpx) and the stock Triton client."""

from __future__ import annotations

import base64
import io
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import real_test_images
from reskd.device import Device
from reskd.manifest import load_manifest
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from server_process import MODELS, ServerProcess, metric, scrape

pytestmark = pytest.mark.server

CASCADE = MODELS / "fashion-mnist" / "1"
TEACHER = MODELS / "fashion-mnist-teacher" / "1"


@pytest.fixture(scope="module")
def server(default_server):
    return default_server  # shared with other modules (tests/conftest.py): counters are read as deltas


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def runtime():
    return CascadeRuntime(CASCADE, device=Device.cpu())


@pytest.fixture(scope="module")
def real_files():
    """The first 48 test images as files: even ones PNG, odd ones JPEG."""
    blobs = real_test_images(48, ["PNG", "JPEG"])
    return [(f"test{i}.{'png' if i % 2 == 0 else 'jpeg'}", blob) for i, blob in enumerate(blobs)]


def expected(rt: CascadeRuntime, blobs: list[bytes], **kwargs):
    return rt.run(np.stack([preprocess(b, rt.manifest.input) for b in blobs]), **kwargs)


def classify(client, files, path="/v1/models/fashion-mnist/classify", **params):
    r = client.post(path, files=[("file", (name, data)) for name, data in files], params=params)
    assert r.status_code == 200, r.text
    return r.json()


def assert_matches(predictions, result, rt):
    manifest = rt.manifest
    assert len(predictions) == len(result)
    for p, cls, conf, stage, flops in zip(predictions, result.class_id, result.confidence, result.exit_stage,
                                          result.flops):
        assert (p["class_id"], p["exit_stage"], p["flops"]) == (cls, stage, flops)
        assert p["confidence"] == pytest.approx(conf, abs=1e-6)
        assert p["label"] == manifest.labels[cls]
        assert p["stages_run"] == stage + 1
        assert p["flops"] == sum(s.flops for s in manifest.stages[:stage + 1])
        assert p["flops_saved_vs_teacher"] == manifest.teacher.flops - p["flops"]
        assert p["flops_saved_vs_cascade"] == sum(manifest.stage_flops) - p["flops"]


def test_multipart_png_and_jpeg_match_the_runtime(client, runtime, real_files):
    body = classify(client, real_files, top_k=3)
    assert (body["model"], body["version"]) == ("fashion-mnist", 1)
    preds = body["predictions"]
    assert [p["filename"] for p in preds] == [name for name, _ in real_files]
    assert_matches(preds, expected(runtime, [d for _, d in real_files]), runtime)
    for p in preds:
        probs = [t["probability"] for t in p["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert p["top_k"][0]["class_id"] == p["class_id"]
        assert p["top_k"][0]["probability"] == pytest.approx(p["confidence"])  # max_prob measure


def test_single_image_bodies_and_routes(client, runtime, real_files):
    name, png = real_files[0]
    want = expected(runtime, [png])
    for path in ("/v1/models/fashion-mnist/classify", "/v1/models/fashion-mnist/versions/1/classify",
                 "/v1/classify"):
        for ctype in ("image/png", "application/octet-stream", "application/x-www-form-urlencoded"):
            r = client.post(path, content=png, headers={"content-type": ctype})
            assert r.status_code == 200, (path, ctype, r.text)
            assert_matches(r.json()["predictions"], want, runtime)
    one = classify(client, [real_files[1]])["predictions"]  # a single multipart part
    assert_matches(one, expected(runtime, [real_files[1][1]]), runtime)
    assert len(one[0]["top_k"]) == 1
    everything = classify(client, [real_files[0]], top_k=50)["predictions"][0]["top_k"]
    assert sorted(t["class_id"] for t in everything) == list(range(10))


def test_threshold_and_max_stage_change_the_exit_stage(client, runtime, real_files):
    blobs = [d for _, d in real_files]
    default = classify(client, real_files)["predictions"]
    zero = classify(client, real_files, threshold=0.0)["predictions"]
    assert all(p["exit_stage"] == 0 for p in zero)
    strict = classify(client, real_files, threshold=1.0)["predictions"]
    assert_matches(strict, expected(runtime, blobs, threshold=1.0), runtime)
    assert sum(p["exit_stage"] for p in strict) > sum(p["exit_stage"] for p in default)
    assert any(p["exit_stage"] == 2 for p in strict)
    capped = classify(client, real_files, threshold=1.0, max_stage=1)["predictions"]
    assert_matches(capped, expected(runtime, blobs, threshold=1.0, max_stage=1), runtime)
    assert max(p["exit_stage"] for p in capped) == 1
    student = classify(client, real_files, max_stage=0)["predictions"]
    assert {p["exit_stage"] for p in student} == {0}
    assert {p["flops"] for p in student} == {runtime.manifest.stages[0].flops}


def test_teacher_is_served_beside_the_cascade(client, real_files):
    teacher = CascadeRuntime(TEACHER, device=Device.cpu())
    preds = classify(client, real_files[:8], path="/v1/models/fashion-mnist-teacher/classify")["predictions"]
    assert_matches(preds, expected(teacher, [d for _, d in real_files[:8]]), teacher)
    assert all(p["flops_saved_vs_teacher"] == 0 for p in preds)


def v2_binary_body(header: dict, blobs: list[bytes]) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "content-type": "application/octet-stream"}


def parse_v2(r) -> dict[str, np.ndarray]:
    """A v2 response, JSON or binary, -> {output name: array}."""
    assert r.status_code == 200, r.text
    length = r.headers.get("inference-header-content-length")
    raw = r.content
    head = json.loads(raw[:int(length)] if length else raw)
    dtypes = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}
    out, offset = {}, int(length or 0)
    for o in head["outputs"]:
        if o["datatype"] == "BYTES":  # strings: as JSON, or each 4-byte length-prefixed
            if "data" in o:
                out[o["name"]] = np.asarray(o["data"], str)
                continue
            size, values, i = o["parameters"]["binary_data_size"], [], offset
            while i < offset + size:
                (n,) = struct.unpack_from("<I", raw, i)
                values.append(raw[i + 4:i + 4 + n].decode())
                i += 4 + n
            out[o["name"]] = np.asarray(values, str)
            offset += size
        elif "data" in o:
            out[o["name"]] = np.asarray(o["data"], dtypes[o["datatype"]]).reshape(o["shape"])
        else:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(raw[offset:offset + size], dtypes[o["datatype"]]).reshape(o["shape"])
            offset += size
    assert offset == len(raw) if length else True
    return out


def assert_v2_matches(out, result):
    if "exit_reason" in out:
        assert out["exit_reason"].tolist() == result.reasons()
    np.testing.assert_array_equal(out["class_id"], result.class_id)
    np.testing.assert_array_equal(out["exit_stage"], result.exit_stage)
    np.testing.assert_array_equal(out["flops"], result.flops)
    np.testing.assert_allclose(out["logits"], result.logits, atol=1e-5)


def test_v2_fp32_json_and_binary(client, runtime, real_files):
    images = np.stack([preprocess(d, runtime.manifest.input) for _, d in real_files[:16]])
    want = runtime.run(images)
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "FP32"}
    r = client.post("/v2/models/fashion-mnist/infer", json={"inputs": [{**tensor, "data": images.tolist()}]})
    assert r.headers["content-type"] == "application/json"
    assert_v2_matches(parse_v2(r), want)
    body, headers = v2_binary_body(
        {"id": "42", "inputs": [{**tensor, "parameters": {"binary_data_size": images.nbytes}}],
         "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in ("logits", "class_id", "exit_stage",
                                                                                "flops", "exit_reason")]},
        [images.astype("<f4").tobytes()])
    r = client.post("/v2/models/fashion-mnist/versions/1/infer", content=body, headers=headers)
    assert json.loads(r.content[:int(r.headers["inference-header-content-length"])])["id"] == "42"
    assert_v2_matches(parse_v2(r), want)
    # Parameters act as the v1 query does; a subset of outputs can be asked for.
    r = client.post("/v2/models/fashion-mnist/infer", json={
        "inputs": [{**tensor, "data": images.ravel().tolist()}], "parameters": {"max_stage": 0},
        "outputs": [{"name": "exit_stage"}]})
    out = parse_v2(r)
    assert list(out) == ["exit_stage"] and not out["exit_stage"].any()


def test_v2_bytes_json_and_binary(client, runtime, real_files):
    blobs = [d for _, d in real_files[:12]]
    want = expected(runtime, blobs, threshold=1.0)
    r = client.post("/v2/models/fashion-mnist/infer", json={
        "inputs": [{"name": "image_bytes", "shape": [12], "datatype": "BYTES",
                    "data": [base64.b64encode(b).decode() for b in blobs]}], "parameters": {"threshold": 1.0}})
    assert_v2_matches(parse_v2(r), want)
    packed = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    body, headers = v2_binary_body({"inputs": [{"name": "image_bytes", "shape": [12], "datatype": "BYTES",
                                                "parameters": {"binary_data_size": len(packed)}}],
                                    "parameters": {"binary_data_output": True, "threshold": 1.0}}, [packed])
    assert_v2_matches(parse_v2(client.post("/v2/models/fashion-mnist/infer", content=body, headers=headers)), want)


def test_stock_triton_client(server, runtime, real_files):
    import tritonclient.http as triton

    tc = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("fashion-mnist") and tc.is_model_ready("fashion-mnist", "1")
    assert not tc.is_model_ready("no-such-model")
    assert "binary_tensor_data" in tc.get_server_metadata()["extensions"]
    meta = tc.get_model_metadata("fashion-mnist")
    assert meta["versions"] == ["1"] and [i["name"] for i in meta["inputs"]] == ["images", "image_bytes"]
    manifest = load_manifest(CASCADE)
    assert [s["flops"] for s in meta["stages"]] == manifest.stage_flops
    assert [s["threshold"] for s in meta["stages"][:-1]] == manifest.exit.thresholds
    config = tc.get_model_config("fashion-mnist")
    assert config["input"][0] == {"name": "images", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}

    images = np.stack([preprocess(d, runtime.manifest.input) for _, d in real_files[:8]])
    inp = triton.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)  # binary tensor data by default; no outputs named: all come back binary
    result = tc.infer("fashion-mnist", [inp])
    want = runtime.run(images)
    for name in ("class_id", "exit_stage", "flops"):
        np.testing.assert_array_equal(result.as_numpy(name), getattr(want, name))
    np.testing.assert_allclose(result.as_numpy("logits"), want.logits, atol=1e-5)

    blobs = np.array([d for _, d in real_files[:8]], dtype=np.object_)
    inp = triton.InferInput("image_bytes", [8], "BYTES")
    inp.set_data_from_numpy(blobs)
    result = tc.infer("fashion-mnist", [inp], model_version="1", parameters={"max_stage": 1, "threshold": 1.0},
                      outputs=[triton.InferRequestedOutput("exit_stage", binary_data=False),
                               triton.InferRequestedOutput("class_id")])
    want = expected(runtime, list(blobs), max_stage=1, threshold=1.0)
    np.testing.assert_array_equal(result.as_numpy("exit_stage"), want.exit_stage)
    np.testing.assert_array_equal(result.as_numpy("class_id"), want.class_id)
    with pytest.raises(triton.InferenceServerException, match="no model"):
        tc.infer("no-such-model", [inp])
    tc.close()


def test_classification_extension_lists_v1s_top_k(server, client, runtime, real_files):
    """Triton's classification extension through stock tritonclient: an output asked for with class_count k comes
    back as BYTES [N, k] "value:index:label", the top k of v1's top_k for the same images (probabilities), or the
    running logits' top k; binary and JSON alike. Bad counts, or an output without a class axis, get 400."""
    import tritonclient.http as triton

    def text(v) -> str:  # bytes from binary outputs, str from JSON ones
        return v.decode() if isinstance(v, bytes) else v

    files = real_files[:6]
    top = [p["top_k"] for p in classify(client, files, top_k=3, threshold=1.0)["predictions"]]
    tc = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert {"classification", "model_repository"} <= set(tc.get_server_metadata()["extensions"])
    blobs = np.array([d for _, d in files], dtype=np.object_)
    inp = triton.InferInput("image_bytes", [len(files)], "BYTES")
    inp.set_data_from_numpy(blobs)
    want = expected(runtime, list(blobs), threshold=1.0)
    for binary in (True, False):
        result = tc.infer("fashion-mnist", [inp], parameters={"threshold": 1.0}, outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
            triton.InferRequestedOutput("logits", binary_data=binary, class_count=2)])
        probs = result.as_numpy("probabilities")
        assert probs.shape == (len(files), 3)
        for row, listed in zip(probs, top):
            parts = [text(v).split(":", 2) for v in row]
            assert [(int(i), label) for _, i, label in parts] == [(t["class_id"], t["label"]) for t in listed]
            assert [float(v) for v, _, _ in parts] == pytest.approx([t["probability"] for t in listed], abs=5e-7)
        logits = result.as_numpy("logits")
        order = np.argsort(-want.logits, axis=-1, kind="stable")[:, :2]
        for row, ids, values in zip(logits, order, want.logits):
            assert [int(text(v).split(":")[1]) for v in row] == ids.tolist()
            assert [float(text(v).split(":")[0]) for v in row] == pytest.approx(values[ids], abs=5e-6)
    for name, k, says in [("class_id", 2, "only an output with a class axis"), ("logits", 0, ">= 1"),
                          ("logits", "3", ">= 1"), ("logits", True, ">= 1")]:
        r = client.post("/v2/models/fashion-mnist/infer", json={
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}],
            "outputs": [{"name": name, "parameters": {"classification": k}}]})
        assert r.status_code == 400 and says in r.json()["error"], (name, k, r.text)
    tc.close()


def test_metrics_move_by_exactly_what_was_served(client, real_files):
    manifest = load_manifest(CASCADE)
    before = scrape(client)
    served = []
    for chunk in (real_files[:5], real_files[5:6], real_files[6:30]):
        served += classify(client, chunk)["predictions"]
    served += classify(client, real_files[:10], threshold=1.0)["predictions"]
    teacher_preds = classify(client, real_files[:4], path="/v1/models/fashion-mnist-teacher/classify")["predictions"]
    bad = client.post("/v1/models/fashion-mnist/classify", content=b"not an image",
                      headers={"content-type": "image/png"})
    assert bad.status_code == 415
    after = scrape(client)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    cm = {"model": "fashion-mnist", "version": "1"}
    n, used = len(served), sum(p["flops"] for p in served)
    assert delta("reskd_images_total", **cm) == n
    assert delta("reskd_flops_total", **cm) == used
    assert delta("reskd_teacher_flops_total", **cm) == n * manifest.teacher.flops
    assert delta("reskd_flops_saved_total", baseline="teacher", **cm) == sum(p["flops_saved_vs_teacher"]
                                                                             for p in served)
    assert delta("reskd_flops_saved_total", baseline="cascade", **cm) == sum(p["flops_saved_vs_cascade"]
                                                                             for p in served)
    for stage in range(3):
        assert delta("reskd_exits_total", stage=str(stage), **cm) == sum(p["exit_stage"] == stage for p in served)
    # rate(flops) / rate(teacher_flops) over the window is the served compute fraction.
    fraction = delta("reskd_flops_total", **cm) / delta("reskd_teacher_flops_total", **cm)
    assert fraction == pytest.approx(used / (n * manifest.teacher.flops), rel=1e-12)
    assert fraction < 0.2
    endpoint = "/v1/models/{name}/classify"
    assert delta("reskd_requests_total", endpoint=endpoint, code="200", **cm) == 4
    assert delta("reskd_requests_total", endpoint=endpoint, code="415", **cm) == 1
    assert delta("reskd_request_duration_seconds_count", endpoint=endpoint, **cm) == 5
    tm = {"model": "fashion-mnist-teacher", "version": "1"}
    assert delta("reskd_images_total", **tm) == len(teacher_preds) == 4
    assert delta("reskd_flops_total", **tm) == delta("reskd_teacher_flops_total", **tm) == 4 * manifest.teacher.flops
    # Stage batches: stage 0 ran every image; later stages only the survivors.
    assert delta("reskd_batch_size_sum", stage="0", **cm) == n
    assert delta("reskd_batch_size_sum", stage="1", **cm) == sum(p["exit_stage"] >= 1 for p in served)
    assert metric(after, "reskd_model_info", stages="3", **cm) == 1
    assert metric(after, "reskd_queue_depth", stage="0", **cm) == 0
    assert metric(after, "reskd_inflight_requests", **cm) == 0
    text = client.get("/metrics").text
    for name in ("reskd_queue_duration_seconds", "reskd_stage_duration_seconds", "reskd_padding_flops_total"):
        assert f'{name}' in text
    # Exit confidence: one observation per image at the stage it left, of the confidence the response gave.
    for stage in range(3):
        left = [p["confidence"] for p in served if p["exit_stage"] == stage]
        assert delta("reskd_exit_confidence_count", stage=str(stage), **cm) == len(left)
        assert delta("reskd_exit_confidence_sum", stage=str(stage), **cm) == pytest.approx(sum(left), abs=1e-9)
        high = sum(c <= 0.99 for c in left)
        assert delta("reskd_exit_confidence_bucket", stage=str(stage), le="0.99", **cm) == high
    assert delta("reskd_exit_confidence_count", **tm) == 4


def test_metrics_carry_the_calibrated_references(client):
    """What calibration measured on validation, as gauges the alerts compare against: a cascade's from its
    manifest's calibration section, a one-stage model's exact (every image runs its one stage)."""
    samples = scrape(client)
    manifest = load_manifest(CASCADE)
    cal, cm = manifest.calibration, {"model": "fashion-mnist", "version": "1"}
    assert metric(samples, "reskd_calibrated_compute_fraction", **cm) == pytest.approx(
        cal.mean_flops / manifest.teacher.flops, rel=1e-12)
    for stage, count in enumerate(cal.exit_counts):
        assert metric(samples, "reskd_calibrated_exit_fraction", stage=str(stage), **cm) == count / cal.n
    assert 0.07 < metric(samples, "reskd_calibrated_compute_fraction", **cm) < 0.08
    kd8 = load_manifest(MODELS / "fashion-mnist-kd-resnet8" / "1")
    km = {"model": "fashion-mnist-kd-resnet8", "version": "1"}
    assert metric(samples, "reskd_calibrated_compute_fraction", **km) == kd8.stages[0].flops / kd8.teacher.flops
    assert metric(samples, "reskd_calibrated_exit_fraction", stage="0", **km) == 1.0
    assert metric(samples, "reskd_calibrated_compute_fraction", model="fashion-mnist-teacher") == 1.0
    assert metric(samples, "reskd_ready") == 1


def test_an_uncalibrated_cascade_has_no_reference_to_compare_against():
    from reskd.service.serving.metrics import Metrics

    manifest = load_manifest(CASCADE).model_copy(update={"calibration": None})
    metrics = Metrics()
    metrics.for_model("uncalibrated", 1, manifest)
    text = metrics.exposition().decode()
    assert 'reskd_exit_confidence_count{model="uncalibrated",stage="0",version="1"} 0.0' in text
    assert 'reskd_calibrated_compute_fraction{model="uncalibrated"' not in text
    assert 'reskd_calibrated_exit_fraction{model="uncalibrated"' not in text


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models/{name}/classify", "/v1/classify", "/v2/models/{name}/infer", "/v2/health/ready",
                 "/metrics"):
        assert path in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_concurrent_requests_are_batched_together(real_files):
    with ServerProcess(max_queue_delay_ms=400, max_batch_size=64) as s:
        with s.client() as c, ThreadPoolExecutor(8) as pool:
            before = scrape(c)
            codes = list(pool.map(lambda f: c.post("/v1/classify", files=[("file", f)]).status_code,
                                  real_files[:8]))
            after = scrape(c)
        assert codes == [200] * 8
        labels = {"model": "fashion-mnist", "version": "1", "stage": "0"}
        batches = metric(after, "reskd_batch_size_count", **labels) - metric(before, "reskd_batch_size_count", **labels)
        images = metric(after, "reskd_batch_size_sum", **labels) - metric(before, "reskd_batch_size_sum", **labels)
        assert images == 8
        assert batches < 8, "every request ran in a batch of its own"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_quiet_start_one_line_per_loaded_model(log_format):
    with ServerProcess(log_format=log_format) as s:
        with s.client() as c:
            assert c.post("/v1/classify", content=_png()).status_code == 200
    lines = s.output().splitlines()
    assert "\x1b[" not in s.output() and "thread_pool_size" not in s.output()  # no onnxruntime warning, no colours
    versions = sorted(f"{p.parent.name}/{p.name}" for p in MODELS.glob("*/*") if (p / "manifest.json").is_file())
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
        messages = [r["message"] for r in records]
        assert any(r["logger"] == "uvicorn.access" and "POST /v1/classify" in r["message"] for r in records)
    else:
        messages = lines
    loaded = [m for m in messages if "loaded " in m]
    assert len(loaded) == len(versions), messages
    assert all(level not in m for m in messages for level in ("WARNING", "ERROR")), messages


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 100).save(buf, "PNG")
    return buf.getvalue()
