"""The gRPC front end (RESKD_GRPC_PORT) against real `reskd serve` processes on loopback, through stock clients:
tritonclient.grpc (sync and asyncio) for what users call, and the protocol's own stubs (tritonclient's generated
service_pb2) for the messages a stock client would never send. Every RPC, auth, each status mapping with the
message HTTP gives, deadlines and cancellation, oversized and malformed messages, two workers, port conflicts, and
answers equal to HTTP's and to the cascade run in the test."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import real_test_images
from reskd.device import Device
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from server_process import (MODELS, InProcessServer, ServerProcess, children_of, free_port, metric, scrape,
                            serve_settings_refused, wait_until_serving)

pytestmark = pytest.mark.server

TOKEN = "grpc-s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
META = tuple(AUTH.items())
NAME = "fashion-mnist"
SERVICE = "/inference.GRPCInferenceService"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpc-repo")
    shutil.copytree(MODELS, path, dirs_exist_ok=True)  # the files, not the links
    return path


@pytest.fixture(scope="module")
def server(repo):
    """Auth on, explicit model control, the small limits of tests/conftest.py (4 images, 300 kB)."""
    with ServerProcess(grpc=True, repo=repo, model_control="explicit", auth_token=TOKEN, max_images=4,
                       max_body_bytes=300_000) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(server.grpc)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def runtime():
    return CascadeRuntime(MODELS / NAME / "1", device=Device.cpu())


@pytest.fixture(scope="module")
def files():
    return real_test_images(8, ["PNG", "JPEG"])


def http_metrics(server) -> dict:
    with server.client() as c:
        return scrape(c)


def images_input(x: np.ndarray) -> tg.InferInput:
    inp = tg.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def bytes_input(blobs: list[bytes]) -> tg.InferInput:
    inp = tg.InferInput("image_bytes", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return inp


def test_the_protocol_code_is_what_protoc_writes_from_the_vendored_protos():
    from reskd.service.rpc.protocol import generate

    for name, text in generate.generate().items():
        assert (generate.HERE / name).read_text() == text, f"{name}: run `make grpc-protocol`"


def test_every_rpc_through_the_stock_client(server, client, runtime, files):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME, headers=AUTH) and client.is_model_ready(NAME, "1", headers=AUTH)
    assert not client.is_model_ready("no-such-model", headers=AUTH)
    with server.client(headers=AUTH) as http:
        assert client.get_server_metadata(headers=AUTH, as_json=True)["extensions"] == \
            http.get("/v2").json()["extensions"]
        meta = client.get_model_metadata(NAME, headers=AUTH, as_json=True)
        want = http.get(f"/v2/models/{NAME}").json()
        assert meta["versions"] == want["versions"] and meta["platform"] == want["platform"]
        for key in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[key]] == \
                [(t["name"], t["datatype"], t["shape"]) for t in want[key]]
        config = client.get_model_config(NAME, headers=AUTH, as_json=True)["config"]
        want = http.get(f"/v2/models/{NAME}/config").json()
        assert json_format.ParseDict(want, type(client.get_model_config(NAME, headers=AUTH).config)()) == \
            json_format.ParseDict(config, type(client.get_model_config(NAME, headers=AUTH).config)())
        assert config["parameters"]["stages"]["string_value"] == "3"

    # Infer: the cascade's own answers for real images, as raw contents (what the stock client sends).
    x = np.stack([preprocess(b, runtime.manifest.input) for b in files[:4]])
    result = client.infer(NAME, [images_input(x)], headers=AUTH)
    want = runtime.run(x)
    for name in ("class_id", "exit_stage", "flops"):
        np.testing.assert_array_equal(result.as_numpy(name), getattr(want, name))
    np.testing.assert_allclose(result.as_numpy("logits"), want.logits, atol=1e-5)
    assert [r.decode() for r in result.as_numpy("exit_reason")] == want.reasons()
    response = result.get_response()
    assert response.model_name == NAME and response.model_version == "1"
    with server.client(headers=AUTH) as http:  # the response's parameters are HTTP's for the same request
        r = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [{
            "name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]})
    assert {k: json_format.MessageToDict(v).popitem()[1] for k, v in response.parameters.items()} == \
        r.json()["parameters"]

    # Encoded images, a version, and the exit parameters as the client's int / double / string parameters.
    want = runtime.run(x, max_stage=1, threshold=1.0)
    for params in ({"max_stage": 1, "threshold": 1.0}, {"max_stage": "1", "threshold": "1.0"},
                   {"max_stage": 1.0, "threshold": 1}):
        result = client.infer(NAME, [bytes_input(files[:4])], model_version="1", parameters=params, headers=AUTH,
                              outputs=[tg.InferRequestedOutput("exit_stage"), tg.InferRequestedOutput("class_id")])
        np.testing.assert_array_equal(result.as_numpy("exit_stage"), want.exit_stage, err_msg=str(params))
        np.testing.assert_array_equal(result.as_numpy("class_id"), want.class_id)
        assert [o.name for o in result.get_response().outputs] == ["exit_stage", "class_id"]

    # Repository: the index, and unload / load under explicit model control.
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert {(e["name"], e["version"], e["state"]) for e in index} >= {(NAME, "1", "READY")}
    client.unload_model("fashion-mnist-kd-resnet14", headers=AUTH)
    assert not client.is_model_ready("fashion-mnist-kd-resnet14", headers=AUTH)
    index = {e["name"]: e for e in client.get_model_repository_index(headers=AUTH, as_json=True)["models"]}
    assert (index["fashion-mnist-kd-resnet14"]["state"], index["fashion-mnist-kd-resnet14"]["reason"]) == \
        ("UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException, match="not served") as err:
        client.infer("fashion-mnist-kd-resnet14", [images_input(x)], headers=AUTH)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    client.load_model("fashion-mnist-kd-resnet14", headers=AUTH)
    assert client.is_model_ready("fashion-mnist-kd-resnet14", headers=AUTH)
    ready = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert {e["name"] for e in ready if e.get("state") == "READY"} >= {"fashion-mnist-kd-resnet14"}


def test_classification_output_is_v1s_top_k(server, client, files):
    with server.client(headers=AUTH) as http:
        r = http.post(f"/v1/models/{NAME}/classify", params={"top_k": 3, "threshold": 1.0},
                      files=[("file", (f"f{i}", b)) for i, b in enumerate(files[:4])])
        assert r.status_code == 200, r.text
        top = [p["top_k"] for p in r.json()["predictions"]]
    result = client.infer(NAME, [bytes_input(files[:4])], parameters={"threshold": 1.0}, headers=AUTH,
                          outputs=[tg.InferRequestedOutput("probabilities", class_count=3)])
    rows = result.as_numpy("probabilities")
    assert rows.shape == (4, 3)
    for row, listed in zip(rows, top):
        parts = [v.decode().split(":", 2) for v in row]
        assert [(int(i), label) for _, i, label in parts] == [(t["class_id"], t["label"]) for t in listed]
        assert [float(v) for v, _, _ in parts] == pytest.approx([t["probability"] for t in listed], abs=5e-7)


def test_typed_contents_give_the_raw_contents_answers(server, stub, runtime, files):
    x = np.stack([preprocess(b, runtime.manifest.input) for b in files[:3]])
    request = pb.ModelInferRequest(model_name=NAME, id="typed-1")
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(
        x.reshape(-1).tolist())
    request.outputs.add(name="class_id")
    request.outputs.add(name="logits").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(request, metadata=META, timeout=30)
    assert response.id == "typed-1" and [o.name for o in response.outputs] == ["class_id", "logits"]
    want = runtime.run(x)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i8"), want.class_id)
    assert list(response.outputs[1].shape) == [3, 2]
    blob, first = response.raw_output_contents[1], []
    for i in range(3):  # each row's first "value:index:label": the class the cascade answered
        (n,) = struct.unpack_from("<I", blob, 0)
        first.append(int(blob[4:4 + n].decode().split(":")[1]))
        for _ in range(2):
            (n,) = struct.unpack_from("<I", blob, 0)
            blob = blob[4 + n:]
    assert first == want.class_id.tolist()
    # Encoded images as typed BYTES contents.
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(files[:3])
    request.outputs.add(name="class_id")
    response = stub.ModelInfer(request, metadata=META, timeout=30)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i8"), want.class_id)


def test_the_asyncio_client(server, runtime, files):
    x = np.stack([preprocess(b, runtime.manifest.input) for b in files[:2]])

    async def run():
        c = tga.InferenceServerClient(server.grpc)
        try:
            assert await c.is_server_ready() and await c.is_model_ready(NAME, headers=AUTH)
            meta = await c.get_model_metadata(NAME, headers=AUTH, as_json=True)
            results = await asyncio.gather(*(c.infer(NAME, [images_input(x)], headers=AUTH) for _ in range(8)))
            stats = await c.get_inference_statistics(NAME, "1", headers=AUTH, as_json=True)
            return meta, results, stats
        finally:
            await c.close()

    meta, results, stats = asyncio.run(run())
    assert meta["name"] == NAME
    want = runtime.run(x)
    for r in results:
        np.testing.assert_array_equal(r.as_numpy("class_id"), want.class_id)
        np.testing.assert_array_equal(r.as_numpy("flops"), want.flops)
    assert int(stats["model_stats"][0]["inference_stats"]["success"]["count"]) >= 8


def test_auth_guards_every_rpc_but_liveness_readiness_and_health(server, stub):
    calls = [("ModelInfer", pb.ModelInferRequest(model_name=NAME)), ("ModelMetadata", pb.ModelMetadataRequest(
        name=NAME)), ("ModelConfig", pb.ModelConfigRequest(name=NAME)), ("ServerMetadata", pb.ServerMetadataRequest()),
        ("ModelReady", pb.ModelReadyRequest(name=NAME)), ("ModelStatistics", pb.ModelStatisticsRequest()),
        ("RepositoryIndex", pb.RepositoryIndexRequest()),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=NAME))]
    before = http_metrics(server)
    for method, request in calls:
        for metadata, says in (((), "missing credentials"), ((("authorization", "Bearer wrong"),),
                                                              "invalid credentials"),
                               ((("authorization", TOKEN),), "invalid credentials")):
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, metadata=metadata, timeout=10)
            assert err.value.code() == C.UNAUTHENTICATED and says in err.value.details(), (method, metadata)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
    after = http_metrics(server)
    refused = metric(after, "reskd_requests_total", endpoint=f"{SERVICE}/ModelInfer", code="401") - \
        metric(before, "reskd_requests_total", endpoint=f"{SERVICE}/ModelInfer", code="401")
    assert refused == 3


def raw_request(shape, datatype="FP32", name="images", raw: bytes | None = b"", **parameters):
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    for key, value in parameters.items():
        p = request.parameters[key]
        if isinstance(value, str):
            p.string_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.int64_param = value
    return request


ONE = np.zeros((1, 1, 28, 28), "<f4").tobytes()
HUGE = 2**32


def with_output(request, name, k=None):
    o = request.outputs.add(name=name)
    if k is not None:
        o.parameters["classification"].int64_param = k
    return request


def typed(count: int):
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28]).contents.fp32_contents.extend(
        [0.0] * count)
    return request


CASES = [
    # (what, request, code, words in the message), the HTTP hostile-input cases that a protobuf message can carry
    ("an unknown model", pb.ModelInferRequest(model_name="no-such-model"), C.NOT_FOUND, "no model 'no-such-model'"),
    ("an unknown version", pb.ModelInferRequest(model_name=NAME, model_version="9"), C.NOT_FOUND, "no version"),
    ("no inputs", pb.ModelInferRequest(model_name=NAME), C.INVALID_ARGUMENT, "send exactly one input"),
    ("a negative dimension", raw_request([-1, 1, 28, 28]), C.INVALID_ARGUMENT, "is negative"),
    ("an element count over int64", raw_request([HUGE, HUGE, 1, 1]), C.INVALID_ARGUMENT,
     "multiply to more than int64 can count"),
    ("an element count over int64 (BYTES)", raw_request([HUGE, HUGE], "BYTES", "image_bytes", b"\0" * 4),
     C.INVALID_ARGUMENT, "multiply to more than int64 can count"),
    ("no elements, but more bytes than int64 can count", raw_request([0, 2**61, 2]), C.INVALID_ARGUMENT,
     "needs more bytes than int64 can count"),
    ("more dimensions than an array can have", raw_request([1] * 65, raw=b"\0" * 4), C.INVALID_ARGUMENT,
     "dimensions"),
    ("raw contents of the wrong size", raw_request([1, 1, 28, 28], raw=ONE[:-4]), C.INVALID_ARGUMENT,
     "needs 3136 bytes, raw_input_contents[0] holds 3132"),
    ("two raw contents for one input", raw_request([1, 1, 28, 28], raw=ONE), C.INVALID_ARGUMENT,
     "raw_input_contents has 2 entries for 1 inputs"),
    ("neither raw nor typed contents", raw_request([1, 1, 28, 28], raw=None), C.INVALID_ARGUMENT, "has no data"),
    ("typed contents of the wrong count", typed(10), C.INVALID_ARGUMENT, "needs 784 values"),
    ("a BYTES length prefix cut short", raw_request([1], "BYTES", "image_bytes", b"\x05\0"), C.INVALID_ARGUMENT,
     "ends inside a 4-byte length prefix"),
    ("a BYTES element past the data", raw_request([1], "BYTES", "image_bytes", b"\x09\0\0\0abc"),
     C.INVALID_ARGUMENT, "runs past the tensor's data"),
    ("bytes that are no image", raw_request([1], "BYTES", "image_bytes", b"\x03\0\0\0abc"), C.INVALID_ARGUMENT,
     "image_bytes[0]"),
    ("an unknown datatype", raw_request([1, 1, 28, 28], "FP16", raw=ONE[:1568]), C.INVALID_ARGUMENT, "'FP16'"),
    ("images of the wrong datatype", raw_request([1, 1, 28, 28], "FP64", raw=ONE * 2), C.INVALID_ARGUMENT,
     "must be FP32"),
    ("images of the wrong shape", raw_request([1, 28, 28], raw=ONE), C.INVALID_ARGUMENT, "must have shape"),
    ("NaN pixels", raw_request([1, 1, 28, 28], raw=np.full((1, 1, 28, 28), np.nan, "<f4").tobytes()),
     C.INVALID_ARGUMENT, "NaN"),
    ("more images than the limit", raw_request([5, 1, 28, 28], raw=ONE * 5), C.RESOURCE_EXHAUSTED,
     "over the limit of 4"),
    ("a threshold that is no number", raw_request([1, 1, 28, 28], raw=ONE, threshold="high"), C.INVALID_ARGUMENT,
     "'threshold' must be a number"),
    ("a threshold beyond a float", raw_request([1, 1, 28, 28], raw=ONE, threshold="1e400"), C.INVALID_ARGUMENT,
     "threshold"),
    ("a max_stage past the cascade", raw_request([1, 1, 28, 28], raw=ONE, max_stage=7), C.INVALID_ARGUMENT,
     "max_stage"),
    ("a fractional max_stage", raw_request([1, 1, 28, 28], raw=ONE, max_stage=1.5), C.INVALID_ARGUMENT,
     "'max_stage' must be an integer"),
    ("a negative timeout", raw_request([1, 1, 28, 28], raw=ONE, timeout=-5), C.INVALID_ARGUMENT, "'timeout'"),
    ("an unknown operating point", raw_request([1, 1, 28, 28], raw=ONE, operating_point="cheapest"),
     C.INVALID_ARGUMENT, "cheapest"),
    ("an unknown output", with_output(raw_request([1, 1, 28, 28], raw=ONE), "scores"), C.INVALID_ARGUMENT,
     "unknown output 'scores'"),
    ("classification of a class id", with_output(raw_request([1, 1, 28, 28], raw=ONE), "class_id", 2),
     C.INVALID_ARGUMENT, "only an output with a class axis"),
    ("classification of 0 classes", with_output(raw_request([1, 1, 28, 28], raw=ONE), "logits", 0),
     C.INVALID_ARGUMENT, ">= 1"),
]
CASES[9][1].raw_input_contents.append(ONE)  # "two raw contents for one input": ONE and ONE


@pytest.mark.parametrize("what,request_,code,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_requests_get_the_code_of_http_s_status_and_its_message(stub, what, request_, code, words):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, metadata=META, timeout=30)
    assert err.value.code() == code and words in err.value.details(), (err.value.code(), err.value.details())
    assert len(err.value.details()) < 2000, "the message must not echo the input at length"


def test_repository_rpcs_refuse_what_they_cannot_do(stub):
    cases = [
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="x" * 300), C.NOT_FOUND, "no model"),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="../" * 100), C.NOT_FOUND,
         "no model"),
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="a\0b"), C.NOT_FOUND, "no model"),
        (stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="other"), C.NOT_FOUND,
         "no model repository 'other'"),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="x" * 300), C.NOT_FOUND, "no model"),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(version="1"), C.INVALID_ARGUMENT, "name the model"),
    ]
    load = pb.RepositoryModelLoadRequest(model_name=NAME)
    load.parameters["config"].string_param = "{}"
    cases.append((stub.RepositoryModelLoad, load, C.INVALID_ARGUMENT, "load parameters are not supported"))
    for call, request, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=META, timeout=30)
        assert err.value.code() == code and words in err.value.details(), (request, err.value.details())


def test_an_oversized_message_is_refused_and_the_server_serves_on(server, stub, client):
    big = raw_request([4, 1, 28, 28], raw=b"\0" * 400_000)  # over RESKD_MAX_BODY_BYTES (300,000)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(big, metadata=META, timeout=30)
    assert err.value.code() == C.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
    assert client.is_server_live() and client.is_model_ready(NAME, headers=AUTH)
    assert "Traceback" not in server.output()


def test_statistics_add_up_to_the_prometheus_counters(server, client, runtime):
    """A model no other test infers with: after a known load its gRPC statistics equal HTTP's and the counters."""
    model = "fashion-mnist-kd-resnet8"
    x = np.zeros((2, 1, 28, 28), np.float32)
    for _ in range(5):
        client.infer(model, [images_input(x)], headers=AUTH)
    with pytest.raises(InferenceServerException):
        client.infer(model, [images_input(np.zeros((2, 1, 28, 27), np.float32))], headers=AUTH)
    stats = client.get_inference_statistics(model, headers=AUTH, as_json=True)["model_stats"]
    with server.client(headers=AUTH) as http:
        want = http.get(f"/v2/models/{model}/stats").json()["model_stats"]
        samples = scrape(http)
    assert len(stats) == 1 and stats[0]["name"] == model
    s, w = stats[0], want[0]
    assert int(s["inference_count"]) == w["inference_count"] == 10 == \
        metric(samples, "reskd_images_total", model=model)
    assert int(s["inference_stats"]["success"]["count"]) == w["inference_stats"]["success"]["count"] == 5
    assert int(s["inference_stats"]["fail"]["count"]) == w["inference_stats"]["fail"]["count"] == 1
    assert int(s["execution_count"]) == w["execution_count"] == \
        metric(samples, "reskd_stage_duration_seconds_count", model=model)
    assert metric(samples, "reskd_requests_total", model=model, endpoint=f"{SERVICE}/ModelInfer", code="200") == 5
    assert metric(samples, "reskd_requests_total", model=model, endpoint=f"{SERVICE}/ModelInfer", code="422") == 1
    assert int(s["last_inference"]) == w["last_inference"] > 0


@pytest.fixture(scope="module")
def warming():
    """A server with a warm-up long enough to be watched."""
    with ServerProcess(grpc=True, wait_ready=False, warmup_batch_sizes="[1024, 1024, 1024]", retry_after_s=2) as s:
        yield s


@pytest.fixture(scope="module")
def slow():
    """In process, with the teacher's batches slowed to 300 ms each: calls sit in the queue long enough to expire, be
    cancelled or find it full (8 images: two 4-image requests)."""
    with InProcessServer(grpc=True, max_queue_images=8, max_batch_size=4, max_images=4, retry_after_s=2,
                         inference_threads=1) as s:
        slow_teacher(s)
        yield s


def slow_teacher(server: InProcessServer, seconds: float = 0.3) -> None:
    """Every batch of the in-process server's teacher takes `seconds` more."""
    teacher = server.app.state.reskd.store.get("fashion-mnist-teacher")
    real_run = teacher.scheduler.runner.run

    def run(stage, parts, keep=False):
        time.sleep(seconds)
        return real_run(stage, parts, keep)

    teacher.scheduler.runner.run = run


def test_before_warm_up_health_says_not_serving_and_calls_get_unavailable_with_retry(warming):
    deadline = time.monotonic() + 30
    while True:
        try:
            with grpc.insecure_channel(warming.grpc) as channel:
                grpc.channel_ready_future(channel).result(timeout=1)
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
                live = stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(raw_request([1, 1, 28, 28], raw=ONE), timeout=5)
                break
        except grpc.FutureTimeoutError:
            assert time.monotonic() < deadline, warming.output()
    if status == health_pb2.HealthCheckResponse.SERVING:
        pytest.fail("the server was warm before the test could see it warming up: raise its warm-up batch sizes")
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING and live and not ready
    assert err.value.code() == C.UNAVAILABLE and "models are still loading" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    assert trailers["retry-after"] == "2" and trailers["grpc-retry-pushback-ms"] == "2000"
    warming.wait_ready()


async def outcomes(calls) -> list[tuple]:
    """(code, response or details, trailing metadata) of each aio call, in order."""
    out = []
    for call in calls:
        try:
            out.append((C.OK, await call, None))
        except grpc.aio.AioRpcError as err:
            out.append((err.code(), err.details(), dict(err.trailing_metadata() or ())))
    return out


def test_a_full_queue_answers_unavailable_with_retry_and_serves_on(slow):
    async def run():
        async with grpc.aio.insecure_channel(slow.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = with_output(raw_request([4, 1, 28, 28], raw=ONE * 4), "class_id")
            request.model_name = "fashion-mnist-teacher"
            calls = [stub.ModelInfer(request, timeout=30) for _ in range(8)]
            return await outcomes(calls)

    results = asyncio.run(run())
    codes = [c for c, _, _ in results]
    assert set(codes) <= {C.OK, C.UNAVAILABLE} and C.OK in codes and C.UNAVAILABLE in codes, codes
    for code, details, trailers in results:
        if code == C.UNAVAILABLE:
            assert "queued" in details and trailers["retry-after"] == "2", (details, trailers)
    samples = http_metrics(slow)
    assert metric(samples, "reskd_requests_total", endpoint=f"{SERVICE}/ModelInfer", code="503") == \
        codes.count(C.UNAVAILABLE)


def test_an_expiring_deadline_and_a_cancelled_call_drop_their_work(slow):
    """Behind a 4-image call that holds the one inference thread for 300 ms, a call whose deadline passes and one its
    client cancels leave the queue before they run: counted 504 and 499, their images dropped."""
    blocker = with_output(raw_request([4, 1, 28, 28], raw=ONE * 4), "class_id")
    request = with_output(raw_request([1, 1, 28, 28], raw=ONE), "class_id")
    blocker.model_name = request.model_name = "fashion-mnist-teacher"
    before = http_metrics(slow)
    with grpc.insecure_channel(slow.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(blocker, timeout=30)
        time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=0.1)
        assert err.value.code() == C.DEADLINE_EXCEEDED
        cancelled = stub.ModelInfer.future(request, timeout=30)
        time.sleep(0.05)
        assert cancelled.cancel()
        assert len(first.result().raw_output_contents[0]) == 4 * 8
        assert stub.ModelInfer(request, timeout=30).outputs  # the server serves on
    teacher = {"model": "fashion-mnist-teacher", "endpoint": f"{SERVICE}/ModelInfer"}
    deadline = time.monotonic() + 10
    while True:  # the server counts a call once its handler is done, shortly after the client gave up
        after = http_metrics(slow)
        counted = {code: metric(after, "reskd_requests_total", code=code, **teacher) -
                   metric(before, "reskd_requests_total", code=code, **teacher) for code in ("200", "499", "504")}
        if counted == {"200": 2, "499": 1, "504": 1} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted == {"200": 2, "499": 1, "504": 1}, counted
    dropped = metric(after, "reskd_dropped_images_total", model="fashion-mnist-teacher") - \
        metric(before, "reskd_dropped_images_total", model="fashion-mnist-teacher")
    assert dropped == 2


def listening_pids(port: int) -> set[int]:
    """The processes holding a listening TCP socket on `port` (from /proc: socket inodes and their owners)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            pids.add(int(fd.parent.parent.name))
    return pids


def test_calls_beyond_the_limit_get_resource_exhausted_counted_429_and_probes_pass():
    """RESKD_MAX_CONNECTIONS=2 and the teacher's batches slowed to 300 ms: of five calls sent at once, two run and the
    others are refused with RESOURCE_EXHAUSTED and retry metadata, each counted as 429; ServerLive and ServerReady
    answer while the two run; the server serves on."""
    with InProcessServer(grpc=True, max_connections=2, retry_after_s=2, inference_threads=1) as s:
        slow_teacher(s)
        request = with_output(raw_request([1, 1, 28, 28], raw=ONE), "class_id")
        request.model_name = "fashion-mnist-teacher"

        async def burst():
            async with grpc.aio.insecure_channel(s.grpc) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                calls = [stub.ModelInfer(request, timeout=30) for _ in range(5)]
                await asyncio.sleep(0.1)
                probes = (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live and \
                    (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
                return probes, await outcomes(calls)

        probes, results = asyncio.run(burst())
        codes = [c for c, _, _ in results]
        assert probes
        assert codes.count(C.OK) == 2 and codes.count(C.RESOURCE_EXHAUSTED) == 3, codes
        for code, details, trailers in results:
            if code == C.RESOURCE_EXHAUSTED:
                assert "2 calls in progress" in details and "RESKD_MAX_CONNECTIONS" in details, details
                assert trailers["retry-after"] == "2" and trailers["grpc-retry-pushback-ms"] == "2000", trailers
        with grpc.insecure_channel(s.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(request, timeout=30).outputs  # the server serves on
        samples = http_metrics(s)
        endpoint = f"{SERVICE}/ModelInfer"
        assert metric(samples, "reskd_requests_total", endpoint=endpoint, code="429") == 3
        assert metric(samples, "reskd_requests_total", endpoint=endpoint, code="200") == 3


def test_two_workers_share_the_grpc_port(runtime, files):
    x = np.stack([preprocess(b, runtime.manifest.input) for b in files[:2]])
    want = runtime.run(x)
    with ServerProcess(grpc=True, workers=2) as s:
        listening = listening_pids(int(s.grpc.rsplit(":", 1)[1]))  # both workers, not the supervisor
        assert len(listening) == 2 and listening <= set(children_of(s.proc.pid)), listening
        for _ in range(12):  # a channel per call: the kernel spreads connections over the workers
            c = tg.InferenceServerClient(s.grpc)
            result = c.infer(NAME, [images_input(x)], outputs=[tg.InferRequestedOutput("class_id")])
            np.testing.assert_array_equal(result.as_numpy("class_id"), want.class_id)
            c.close()
        with s.client() as http:
            samples = scrape(http)
            stats = http.get(f"/v2/models/{NAME}/versions/1/stats").json()["model_stats"][0]
        c = tg.InferenceServerClient(s.grpc)
        grpc_stats = c.get_inference_statistics(NAME, "1", as_json=True)["model_stats"][0]
        c.close()
        assert int(grpc_stats["inference_stats"]["success"]["count"]) == \
            stats["inference_stats"]["success"]["count"] == 12
        assert metric(samples, "reskd_requests_total", endpoint=f"{SERVICE}/ModelInfer", code="200") == 12


def test_a_claimed_grpc_port_keeps_other_servers_off_it_and_lets_the_workers_bind_it():
    from reskd.service.rpc.server import claim_port

    port = free_port()
    claim = claim_port("127.0.0.1", port)
    try:
        for host in ("127.0.0.1", "0.0.0.0"):  # another server on this port number, whatever its address
            with pytest.raises(RuntimeError, match=f"cannot bind the gRPC port {host}:{port} .*another reskd server "
                                                   f"on this machine serves gRPC on port {port}"):
                claim_port(host, port)
        with socket.socket() as worker:  # as grpcio binds a worker's port (grpc.so_reuseport)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        claim.close()
    claim_port("127.0.0.1", port).close()  # free again once the server exits


def test_a_restart_claims_a_grpc_port_its_predecessor_left_connections_in_time_wait_on():
    with socket.socket() as listener:  # a one-worker server's port (grpcio: SO_REUSEADDR, no SO_REUSEPORT)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen()
        with socket.socket() as client:
            client.connect(("127.0.0.1", port))
            accepted, _ = listener.accept()
            accepted.close()  # the server closes first: its side waits in TIME_WAIT
            client.recv(1)
    from reskd.service.rpc.server import claim_port

    claim_port("127.0.0.1", port).close()


def test_two_servers_of_several_workers_started_together_never_share_the_grpc_port():
    port = free_port()
    servers = [ServerProcess(wait_ready=False, workers=2, grpc_port=port) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not any(s.proc.poll() is not None for s in servers):
            ready = []
            for s in servers:
                try:
                    ready.append(httpx.get(f"{s.url}/v2/health/ready", timeout=2).status_code == 200)
                except httpx.TransportError:
                    ready.append(False)
            assert not all(ready), "two servers both serve the gRPC port " + str(port)
            assert time.monotonic() < deadline, [s.output()[-2000:] for s in servers]
            time.sleep(0.1)
        gone, serving = sorted(servers, key=lambda s: s.proc.poll() is None)
        assert gone.proc.wait(30) == 2 and f"cannot bind the gRPC port 127.0.0.1:{port}" in gone.output(), \
            gone.output()[-2000:]
        serving.wait_ready()
        wait_until_serving(f"127.0.0.1:{port}", lambda: None if serving.proc.poll() is None else serving.output())
    finally:
        for s in servers:
            s.stop()


def test_a_grpc_port_that_is_taken_or_the_http_port_stops_serve_with_status_2():
    port = free_port()
    with socket.socket() as other:  # another server's gRPC port, shared through SO_REUSEPORT as grpcio binds it
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        for workers in ("1", "2"):
            r = serve_settings_refused(RESKD_GRPC_PORT=str(port), RESKD_WORKERS=workers)
            assert r.returncode == 2 and f"cannot bind the gRPC port 127.0.0.1:{port}" in r.stderr, r.stderr
    r = serve_settings_refused(RESKD_GRPC_PORT="1")  # serve_settings_refused serves HTTP on port 1 too
    assert r.returncode == 2 and "RESKD_GRPC_PORT (1) is RESKD_PORT too" in r.stderr, r.stderr
