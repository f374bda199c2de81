"""Bad input, overload, auth and start-up, against a real `reskd serve` on loopback: every refusal is JSON
{"error": ...} with the status docs/design.md ("Errors") names, and the server stays healthy."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from server_process import MODELS, InProcessServer, ServerProcess

pytestmark = pytest.mark.server

CLASSIFY = "/v1/models/fashion-mnist/classify"
INFER = "/v2/models/fashion-mnist/infer"


def png(size=(28, 28), value=128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(small_limits_server):
    return small_limits_server  # max_images=4, max_body_bytes=300_000 (tests/conftest.py), shared


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def v2(tensor: dict, **extra) -> dict:
    return {"json": {"inputs": [tensor], **extra}}


def fp32(shape=(1, 1, 28, 28), data=None, **kw) -> dict:
    n = int(np.prod(shape))
    return {"name": "images", "datatype": "FP32", "shape": list(shape),
            "data": data if data is not None else [0.0] * n, **kw}


def binary(header: dict, blob: bytes, length: int | None = None) -> dict:
    head = json.dumps(header).encode()
    return {"content": head + blob, "headers": {"Inference-Header-Content-Length": str(len(head) if length is None
                                                                                      else length)}}


GOOD = png()
NOISE = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(NOISE, "PNG")
BOMB = png((7000, 7000), 0)  # 49 M pixels in a few tens of kB: over the 40 M pixel limit
CASES = [
    # (what, method, path, request kwargs, status, words in the message)
    ("no file part", "post", CLASSIFY, {"files": [("image", ("a.png", GOOD))]}, 400, "no 'file' part"),
    ("text field, not a file", "post", CLASSIFY, {"data": {"file": "abc"}, "files": [("x", ("x", b"1"))]}, 400,
     "not a file upload"),
    ("empty body", "post", CLASSIFY, {"content": b"", "headers": {"content-type": "image/png"}}, 400, "no body"),
    ("json body", "post", CLASSIFY, {"json": {"image": "x"}}, 415, "application/json"),
    ("text body", "post", "/v1/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
     "text/plain"),
    ("not an image", "post", CLASSIFY, {"files": [("file", ("a.png", b"GIF89a not really"))]}, 415,
     "cannot identify"),
    ("truncated png", "post", CLASSIFY, {"files": [("file", ("a.png", NOISE.getvalue()[:400]))]}, 415, "truncated"),
    ("empty part", "post", CLASSIFY, {"files": [("file", ("a.png", b""))]}, 415, "empty image"),
    ("decompression bomb", "post", CLASSIFY, {"content": BOMB, "headers": {"content-type": "image/png"}}, 413,
     "pixels"),
    ("body over the limit", "post", CLASSIFY, {"content": b"\0" * 300_001, "headers": {"content-type": "image/png"}},
     413, "300,000 bytes"),
    ("chunked body over the limit", "post", CLASSIFY, {"content": iter([b"\0" * 200_000] * 2),
                                                       "headers": {"content-type": "image/png"}}, 413, "limit"),
    ("too many images", "post", CLASSIFY, {"files": [("file", ("a.png", GOOD))] * 5}, 413, "more than 4 images"),
    ("unknown model", "post", "/v1/models/nope/classify", {"content": GOOD}, 404, "no model 'nope'"),
    ("unknown version", "post", "/v1/models/fashion-mnist/versions/9/classify", {"content": GOOD}, 404,
     "no version"),
    ("unknown route", "get", "/v3/anything", {}, 404, "no route"),
    ("threshold > 1", "post", CLASSIFY + "?threshold=1.5", {"content": GOOD}, 422, "threshold"),
    ("threshold not a number", "post", CLASSIFY + "?threshold=high", {"content": GOOD}, 422, "threshold"),
    ("max_stage past the last", "post", CLASSIFY + "?max_stage=3", {"content": GOOD}, 422, "between 0 and 2"),
    ("top_k 0", "post", CLASSIFY + "?top_k=0", {"content": GOOD}, 422, "top_k"),
    ("v2 malformed json", "post", INFER, {"content": b"{not json", "headers": {"content-type": "application/json"}},
     400, "not valid JSON"),
    ("v2 no inputs", "post", INFER, {"json": {"inputs": []}}, 400, "inputs"),
    ("v2 NaN", "post", INFER, {"content": json.dumps({"inputs": [fp32(data=[math.nan] * 784)]}).encode()}, 422,
     "NaN or infinite"),
    ("v2 infinite (binary)", "post", INFER,
     binary({"inputs": [fp32(data=None, parameters={"binary_data_size": 3136}) | {"data": None}]},
            np.full(784, np.inf, "<f4").tobytes()), 422, "NaN or infinite"),
    ("v2 wrong image shape", "post", INFER, v2(fp32((1, 3, 28, 28))), 422, "[N, 1, 28, 28]"),
    ("v2 data size mismatch", "post", INFER, v2(fp32(data=[0.0] * 10)), 400, "needs 784 values"),
    ("v2 binary size mismatch", "post", INFER,
     binary({"inputs": [fp32(parameters={"binary_data_size": 100}) | {"data": None}]}, b"\0" * 100), 400,
     "needs 3136 bytes"),
    ("v2 header length past the body", "post", INFER, binary({"inputs": [fp32()]}, b"", length=10**6), 400,
     "Inference-Header-Content-Length"),
    ("v2 stray binary data", "post", INFER, binary({"inputs": [fp32()]}, b"\0" * 8), 400, "belong to no input"),
    ("v2 unknown input", "post", INFER, v2(fp32() | {"name": "pixels"}), 400, "exactly one input"),
    ("v2 unknown output", "post", INFER, v2(fp32(), outputs=[{"name": "probs"}]), 400, "unknown output"),
    ("v2 wrong datatype", "post", INFER, v2(fp32() | {"datatype": "INT64", "data": [0] * 784}), 422, "must be FP32"),
    ("v2 bad base64", "post", INFER, v2({"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                         "data": ["%%%"]}), 400, "base64"),
    ("v2 undecodable bytes", "post", INFER, v2({"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                "data": ["aGVsbG8="]}), 415, "image_bytes[0]"),
    ("v2 batch too large", "post", INFER, v2(fp32((5, 1, 28, 28))), 413, "limit of 4"),
    ("v2 empty batch", "post", INFER, v2(fp32((0, 1, 28, 28))), 422, "no images"),
    ("v2 threshold not a number", "post", INFER, v2(fp32(), parameters={"threshold": "x"}), 422, "threshold"),
    ("v2 max_stage too large", "post", INFER, v2(fp32(), parameters={"max_stage": 7}), 422,
     "max_stage must be between 0 and 2, got 7 (fashion-mnist version 1)"),
    ("v2 threshold out of range", "post", INFER, v2(fp32(), parameters={"threshold": 1.5}), 422,
     "threshold must be between 0 and 1, got 1.5"),
    ("operating point of a version without a curve", "post", CLASSIFY + "?operating_point=budget-20",
     {"content": GOOD}, 422, "fashion-mnist:1 has no operating point 'budget-20'; its points are default (it was "
                             "calibrated before curves were stored: `reskd calibrate` adds them)"),
    ("operating point not an id", "post", CLASSIFY + "?operating_point=../x", {"content": GOOD}, 422,
     "operating_point"),
    ("v2 operating point not a string", "post", INFER, v2(fp32(), parameters={"operating_point": 3}), 422,
     "parameter 'operating_point' must be a string, got 3"),
    ("v2 operating point of a version without a curve", "post", INFER,
     v2(fp32(), parameters={"operating_point": "depth-1"}), 422, "has no operating point 'depth-1'"),
    ("v2 unsupported encoding", "post", INFER, {"content": b"x", "headers": {"content-encoding": "br"}}, 415, "br"),
    ("v2 unknown model metadata", "get", "/v2/models/nope", {}, 404, "no model"),
    ("v2 unknown version config", "get", "/v2/models/fashion-mnist/versions/2/config", {}, 404, "no version"),
    ("wrong method", "get", CLASSIFY, {}, 405, "GET"),
]


@pytest.mark.parametrize("what,method,path,kwargs,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(client, what, method, path, kwargs, status, words):
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and words in body["error"], body
    assert "Traceback" not in r.text


def test_server_is_healthy_after_bad_input(server, client):
    for what, method, path, kwargs, status, words in CASES:
        if isinstance(kwargs.get("content"), type(iter([]))):
            continue  # a consumed iterator
        client.request(method.upper(), path, **kwargs)
    assert server.proc.poll() is None
    assert client.get("/v2/health/ready").status_code == 200
    r = client.post(CLASSIFY, files=[("file", ("a.png", GOOD))] * 4)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4


def test_gzip_request_bodies_are_accepted(client):
    import gzip

    r = client.post(INFER, content=gzip.compress(json.dumps({"inputs": [fp32()]}).encode()),
                    headers={"content-encoding": "gzip", "content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_full_queue_answers_503_with_retry_after():
    images = np.zeros((64, 1, 28, 28), "<f4").tobytes()
    request = binary({"inputs": [{"name": "images", "datatype": "FP32", "shape": [64, 1, 28, 28],
                                  "parameters": {"binary_data_size": len(images)}}],
                      "outputs": [{"name": "class_id"}]}, images)
    with ServerProcess(max_queue_images=64, max_batch_size=64, retry_after_s=2) as s:
        with s.client() as c, ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: c.post("/v2/models/fashion-mnist-teacher/infer", **request),
                                      range(12)))
            codes = [r.status_code for r in responses]
            assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
            for r in responses:
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "2" and "queued" in r.json()["error"]
                else:
                    assert len(r.json()["outputs"][0]["data"]) == 64
            # Nothing was left behind: the queue drains and the server serves again.
            assert c.post("/v2/models/fashion-mnist-teacher/infer", **request).status_code == 200
            assert c.get("/v2/health/ready").status_code == 200


def test_bearer_token_guards_inference_and_models_only():
    with ServerProcess(auth_token="s3cret-token") as s:
        with s.client() as c:
            for path, method in ((CLASSIFY, "POST"), ("/v1/classify", "POST"), (INFER, "POST"),
                                 ("/v2/models/fashion-mnist", "GET"), ("/v2/models/fashion-mnist/config", "GET"),
                                 ("/v2", "GET")):
                r = c.request(method, path, content=GOOD)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
                assert "missing credentials" in r.json()["error"]
                r = c.request(method, path, content=GOOD, headers={"authorization": "Bearer wrong"})
                assert r.status_code == 401 and "invalid credentials" in r.json()["error"]
            ok = {"authorization": "Bearer s3cret-token"}
            assert c.post(CLASSIFY, content=GOOD, headers=ok).status_code == 200
            assert c.get("/v2/models/fashion-mnist", headers=ok).status_code == 200
            for open_path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/docs", "/openapi.json"):
                assert c.get(open_path).status_code == 200, open_path
            assert 'code="401"' in c.get("/metrics").text


def test_ready_only_after_warm_up():
    with ServerProcess(wait_ready=False, warmup_batch_sizes="[1024, 1024]") as s:
        with s.client() as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    live = c.get("/v2/health/live")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, s.output()
                    time.sleep(0.05)
            ready = c.get("/v2/health/ready")
            refused = c.post(CLASSIFY, content=GOOD)
            unready_gauge = "\nreskd_ready 0.0\n" in c.get("/metrics").text
            assert live.status_code == 200
            assert ready.status_code == 503 and "loading" in ready.json()["error"], s.output()
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert unready_gauge  # the readiness alert's signal
            s.wait_ready()
            assert c.post(CLASSIFY, content=GOOD).status_code == 200
            assert "\nreskd_ready 1.0\n" in c.get("/metrics").text


def serve_exit(repo, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reskd.cli", "serve", "--repo", str(repo), "--port", "1"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def test_a_broken_repository_fails_at_start_with_a_message(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(MODELS, repo)
    stage = next((repo / "fashion-mnist" / "1").glob("*.onnx"))
    stage.write_bytes(stage.read_bytes()[:-10])
    out = serve_exit(repo)
    assert out.returncode == 2 and "sha256" in out.stderr and stage.name in out.stderr, out.stderr
    out = serve_exit(tmp_path / "missing")
    assert out.returncode == 2 and "does not exist" in out.stderr
    (tmp_path / "empty").mkdir()
    out = serve_exit(tmp_path / "empty")
    assert out.returncode == 2 and "holds no model versions" in out.stderr
    out = serve_exit(MODELS, RESKD_SCHEDULER="fastest", RESKD_MAX_IMAGES="-1")
    assert out.returncode == 2, out.stderr
    assert "RESKD_SCHEDULER: Input should be 'auto', 'stage', 'request' or 'none'" in out.stderr
    assert "RESKD_MAX_IMAGES: Input should be greater than 0" in out.stderr
    out = serve_exit(MODELS, RESKD_MAX_BODY_BYTES="2000000", RESKD_MAX_INFLIGHT_BODY_BYTES="1000000",
                     RESKD_BODY_TIMEOUT_S="0")
    assert out.returncode == 2, out.stderr
    assert "RESKD_BODY_TIMEOUT_S: Input should be greater than 0" in out.stderr, out.stderr
    out = serve_exit(MODELS, RESKD_MAX_BODY_BYTES="2000000", RESKD_MAX_INFLIGHT_BODY_BYTES="1000000")
    assert out.returncode == 2 and "must be at least RESKD_MAX_BODY_BYTES" in out.stderr, out.stderr
    # A bound engine's buffers are allocated once: its largest bucket must hold any batch the scheduler forms.
    out = serve_exit(MODELS, RESKD_STAGE_RUNNER="bound", RESKD_SCHEDULER="request", RESKD_BATCH_BUCKETS="[1, 4]")
    assert out.returncode == 2 and "largest batch bucket (4)" in out.stderr and "max_images" in out.stderr, \
        out.stderr
    out = serve_exit(MODELS, RESKD_CUDA_GRAPHS="true")  # the test machine's device is its CPU
    assert out.returncode == 2 and "CUDA graphs need the bound engine on a CUDA device" in out.stderr, out.stderr


def test_several_versions_are_served_at_once(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(MODELS, repo)
    v2_dir = repo / "fashion-mnist" / "2"
    shutil.copytree(repo / "fashion-mnist" / "1", v2_dir)
    manifest = json.loads((v2_dir / "manifest.json").read_text())
    manifest["version"] = 2
    manifest["exit"]["thresholds"] = [1.0, 1.0]  # version 2 runs (almost) every image through every stage
    (v2_dir / "manifest.json").write_text(json.dumps(manifest))
    with ServerProcess(repo=repo) as s:
        with s.client() as c:
            meta = c.get("/v2/models/fashion-mnist").json()
            assert meta["versions"] == ["1", "2"] and meta["version"] == "2"
            assert [st["threshold"] for st in meta["stages"][:2]] == [1.0, 1.0]
            files = [("file", ("a.png", NOISE.getvalue()))] * 3
            latest = c.post(CLASSIFY, files=files).json()
            first = c.post("/v1/models/fashion-mnist/versions/1/classify", files=files).json()
            assert latest["version"] == 2 and first["version"] == 1
            assert {p["exit_stage"] for p in latest["predictions"]} == {2}
            assert c.get("/v2/models/fashion-mnist/versions/1").json()["stages"][0]["threshold"] < 1
            config = c.get("/v2/models/fashion-mnist/config").json()
            assert config["parameters"]["scheduler"] == {"string_value": "stage"}  # auto, resolved on CPU
            assert 'model_info{model="fashion-mnist",stages="3",version="2"}' in c.get("/metrics").text.replace(
                "reskd_", "")


def test_a_failure_inside_a_batch_is_a_500_that_names_the_stage_not_a_422():
    """Whatever a stage batch raises on the server's side (a ValueError included) is the server's fault: 500 with
    a message and no stack trace. Only settings the client sent (threshold, max_stage) are a 422."""
    with InProcessServer() as s:
        model = s.app.state.reskd.store.get("fashion-mnist")
        runner = model.scheduler.runner

        class Broken:
            max_blocks = runner.max_blocks
            lock = runner.lock
            upload = staticmethod(runner.upload)
            stage_block = staticmethod(runner.stage_block)

            @staticmethod
            def run(stage, parts):
                raise ValueError("an internal shape check failed")

        with s.client() as c:
            model.scheduler.runner = Broken()
            r = c.post(CLASSIFY, content=GOOD)
            assert r.status_code == 500, r.text
            assert "stage 0 of fashion-mnist version 1" in r.json()["error"]
            assert "shape check" not in r.text and "Traceback" not in r.text
            r = c.post(INFER, **v2(fp32()))
            assert r.status_code == 500, r.text
            model.scheduler.runner = runner
            assert c.post(CLASSIFY, content=GOOD).status_code == 200  # nothing wedged
            r = c.post(CLASSIFY, content=GOOD, params={"max_stage": 7})
            assert r.status_code == 422 and "max_stage must be between 0 and 2" in r.json()["error"]


def test_a_kubernetes_service_link_in_reskd_port_is_named_as_such():
    """A Service named `reskd` puts RESKD_PORT=tcp://IP:PORT in every pod of its namespace (service links)."""
    out = subprocess.run([sys.executable, "-m", "reskd.cli", "serve"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RESKD_PORT": "tcp://10.0.0.3:8000"})
    assert out.returncode == 2 and "Kubernetes service link" in out.stderr and "enableServiceLinks" in out.stderr
